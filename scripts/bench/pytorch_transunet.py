#!/usr/bin/env python3
"""Reference benchmark: a PyTorch TransUNet R50-ViT-B/16 train step and forward on the CPU.

This is NOT part of the test suite. It times the same model, geometry, loss and optimiser step as
`ultrarefiner bench --workload transunet-train-step` / `transunet-forward` (configs/paper.toml, SPEC §5, §9.1), so
the Rust numbers can be compared with PyTorch on the same machine and the same thread count.

Model (SPEC §5.2, paper geometry): ResNet-50 v2 hybrid with StdConv2d + GroupNorm(32), units [3, 4, 9], width 64;
1x1 patch embedding to 768 + position embeddings + dropout 0.1; ViT-B (12 pre-LN layers, 12 heads, MLP 3072, exact
GELU); DecoderCup (conv_more 768->512, blocks 512->256->128->64->16 with skips [512, 256, 64, 0], Conv3x3+BN+ReLU
twice, bilinear x2 with align_corners=True); segmentation head Conv3x3 16->2. Input (B, 1, 224, 224) repeated to
3 channels. Loss 0.5*CE + 0.5*Dice2 (squared denominators, batch-pooled, eps 1e-5). SGD lr 0.01, momentum 0.9,
weight decay 1e-4. Inputs: uniform random images and a centred disc mask, like the Rust bench.

Run (PyTorch >= 1.12 on the CPU; any torch wheel works, CUDA is not used):

    python3 -m venv /tmp/venv-torch && /tmp/venv-torch/bin/pip install torch numpy
    /tmp/venv-torch/bin/python scripts/bench/pytorch_transunet.py --threads 2 --batch 4 --n 3 --warmup 1

It prints one JSON line per workload (`transunet-forward`, `transunet-train-step`) with the median/min/max wall
milliseconds, the process CPU seconds per repetition and the peak RSS, in the spirit of `ultrarefiner bench`.
"""
import argparse
import json
import math
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class StdConv2d(nn.Conv2d):
    """Weight-standardised conv (BiT): population variance over (in, kh, kw), eps 1e-5."""

    def forward(self, x):
        w = self.weight
        v, m = torch.var_mean(w, dim=[1, 2, 3], keepdim=True, unbiased=False)
        w = (w - m) / torch.sqrt(v + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def conv3x3(cin, cout, stride=1):
    return StdConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return StdConv2d(cin, cout, 1, stride=stride, padding=0, bias=False)


class Bottleneck(nn.Module):
    """Post-activation bottleneck ("PreActBottleneck" in the original)."""

    def __init__(self, cin, cout, cmid, stride):
        super().__init__()
        self.gn1 = nn.GroupNorm(32, cmid, eps=1e-6)
        self.conv1 = conv1x1(cin, cmid)
        self.gn2 = nn.GroupNorm(32, cmid, eps=1e-6)
        self.conv2 = conv3x3(cmid, cmid, stride)
        self.gn3 = nn.GroupNorm(32, cout, eps=1e-6)
        self.conv3 = conv1x1(cmid, cout)
        self.relu = nn.ReLU(inplace=True)
        if stride != 1 or cin != cout:
            self.downsample = conv1x1(cin, cout, stride)
            self.gn_proj = nn.GroupNorm(cout, cout)

    def forward(self, x):
        residual = x
        if hasattr(self, "downsample"):
            residual = self.gn_proj(self.downsample(x))
        y = self.relu(self.gn1(self.conv1(x)))
        y = self.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return self.relu(residual + y)


class ResNetV2(nn.Module):
    def __init__(self, units=(3, 4, 9), width=64):
        super().__init__()
        w = width
        self.root = nn.Sequential(
            StdConv2d(3, w, 7, stride=2, padding=3, bias=False),
            nn.GroupNorm(32, w, eps=1e-6),
            nn.ReLU(inplace=True),
        )
        stages = [(w, 4 * w, w, 1), (4 * w, 8 * w, 2 * w, 2), (8 * w, 16 * w, 4 * w, 2)]
        self.body = nn.ModuleList()
        for (cin, cout, cmid, stride), n in zip(stages, units):
            blocks = [Bottleneck(cin, cout, cmid, stride)]
            blocks += [Bottleneck(cout, cout, cmid, 1) for _ in range(n - 1)]
            self.body.append(nn.Sequential(*blocks))

    def forward(self, x):
        features = []
        b, c, in_size, _ = x.size()
        x = self.root(x)
        features.append(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=0)
        for i in range(len(self.body) - 1):
            x = self.body[i](x)
            right = int(in_size / 4 / (i + 1))
            if x.size(2) != right:
                feat = torch.zeros((b, x.size(1), right, right), device=x.device, dtype=x.dtype)
                feat[:, :, : x.size(2), : x.size(3)] = x
            else:
                feat = x
            features.append(feat)
        x = self.body[-1](x)
        return x, features[::-1]


class Attention(nn.Module):
    def __init__(self, d=768, heads=12):
        super().__init__()
        self.h, self.dh = heads, d // heads
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def heads(t):
            return t.view(b, n, self.h, self.dh).permute(0, 2, 1, 3)

        q, k, v = heads(self.query(x)), heads(self.key(x)), heads(self.value(x))
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.dh), dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).contiguous().view(b, n, d)
        return self.out(ctx)


class Block(nn.Module):
    def __init__(self, d=768, mlp=3072, dropout=0.1):
        super().__init__()
        self.attention_norm = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d)
        self.ffn_norm = nn.LayerNorm(d, eps=1e-6)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.attn(self.attention_norm(x))
        h = self.drop(F.gelu(self.fc1(self.ffn_norm(x))))
        return x + self.drop(self.fc2(h))


class Conv2dReLU(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
        )


class DecoderBlock(nn.Module):
    def __init__(self, cin, cout, skip):
        super().__init__()
        self.conv1 = Conv2dReLU(cin + skip, cout)
        self.conv2 = Conv2dReLU(cout, cout)

    def forward(self, x, skip=None):
        x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.conv2(self.conv1(x))


class TransUNet(nn.Module):
    def __init__(self, img=224, d=768, layers=12, n_classes=2):
        super().__init__()
        self.g = img // 16
        self.hybrid_model = ResNetV2()
        self.patch_embeddings = nn.Conv2d(1024, d, 1)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.g * self.g, d))
        self.dropout = nn.Dropout(0.1)
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))
        self.encoder_norm = nn.LayerNorm(d, eps=1e-6)
        self.conv_more = Conv2dReLU(d, 512)
        chans, skips = [256, 128, 64, 16], [512, 256, 64, 0]
        ins = [512] + chans[:-1]
        self.blocks = nn.ModuleList(DecoderBlock(i, o, s) for i, o, s in zip(ins, chans, skips))
        self.segmentation_head = nn.Conv2d(16, n_classes, 3, padding=1)

    def forward(self, x):
        if x.size(1) == 1:
            x = x.repeat(1, 3, 1, 1)
        x, features = self.hybrid_model(x)
        x = self.patch_embeddings(x).flatten(2).transpose(-1, -2)
        x = self.dropout(x + self.position_embeddings)
        for layer in self.layers:
            x = layer(x)
        x = self.encoder_norm(x)
        b, n, d = x.shape
        x = x.permute(0, 2, 1).contiguous().view(b, d, self.g, self.g)
        x = self.conv_more(x)
        for i, block in enumerate(self.blocks):
            x = block(x, features[i] if i < 3 else None)
        return self.segmentation_head(x)


def phase1_loss(logits, target):
    """0.5*CE + 0.5*Dice2 (SPEC §9.1)."""
    ce = F.cross_entropy(logits, target.long())
    p = torch.softmax(logits, dim=1)
    t = F.one_hot(target.long(), logits.size(1)).permute(0, 3, 1, 2).float()
    dice = 0.0
    for c in range(logits.size(1)):
        inter = (p[:, c] * t[:, c]).sum()
        den = (p[:, c] ** 2).sum() + (t[:, c] ** 2).sum()
        dice = dice + 1.0 - (2 * inter + 1e-5) / (den + 1e-5)
    return 0.5 * ce + 0.5 * dice / logits.size(1)


def inputs(b, s):
    x = torch.rand(b, 1, s, s)
    yy, xx = torch.meshgrid(torch.arange(s, dtype=torch.float32), torch.arange(s, dtype=torch.float32), indexing="ij")
    c, r = s / 2.0, s / 4.0
    m = (((yy - c) ** 2 + (xx - c) ** 2) < r * r).float()
    return x, m.expand(b, s, s).contiguous()


def timed(fn, n, warmup):
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(n):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append((time.perf_counter() - t0) * 1e3)
        cpus.append(time.process_time() - c0)
    return walls, cpus


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--n", type=int, default=3, help="timed repetitions")
    ap.add_argument("--warmup", type=int, default=1, help="untimed repetitions")
    ap.add_argument("--workload", choices=["all", "transunet-forward", "transunet-train-step"], default="all")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(42)
    model = TransUNet()
    x, y = inputs(a.batch, 224)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)

    def forward():
        model.eval()
        with torch.no_grad():
            float(model(x).sum())

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = phase1_loss(model(x), y)
        loss.backward()
        opt.step()
        float(loss)

    todo = {"transunet-forward": forward, "transunet-train-step": train_step}
    for name, fn in todo.items():
        if a.workload not in ("all", name):
            continue
        walls, cpus = timed(fn, a.n, a.warmup)
        print(json.dumps({
            "workload": name,
            "impl": f"pytorch {torch.__version__}",
            "batch": a.batch,
            "threads": torch.get_num_threads(),
            "median_ms": statistics.median(walls),
            "min_ms": min(walls),
            "max_ms": max(walls),
            "cpu_s_median": statistics.median(cpus),
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        }), flush=True)


if __name__ == "__main__":
    main()
