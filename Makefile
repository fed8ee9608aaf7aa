# UltraRefiner-rs — every heavy target uses --release (SPEC §1.4).
CARGO        ?= cargo
RELEASE      := target/release
CONFIG       ?= paper
DATASET      ?= BUSI
DATASETS     ?= BUSI BUSBRA BUS BUS_UC BUS_UCLM
FOLD         ?= 0
FOLDS        ?= 0 1 2 3 4
RAW_ROOT     ?= dataset/raw
DATA_ROOT    ?= dataset/processed
AUG_ROOT     ?= dataset/augmented
DEVICE       ?= cpu
CHECKPOINTS  ?= checkpoints
RESULTS      ?= results
# Phase 2 trains one SAM on the union of DATASETS; its run name is the sorted names joined by '_' (SPEC §8.9).
P2_RUN       ?= $(shell printf '%s\n' $(DATASETS) | LC_ALL=C sort -u | paste -sd_ -)
SAM_CHECKPOINT ?= medsam-vit-b
# Extra flags per step, e.g. PHASE2_ARGS="--epochs 20 --use-lora" (see each binary's --help).
AUGMENT_ARGS ?=
PHASE1_ARGS  ?=
PHASE2_ARGS  ?=
PHASE3_ARGS  ?=
P1_DIR        = $(CHECKPOINTS)/transunet
P2_DIR        = $(CHECKPOINTS)/sam_finetuned
P3_DIR        = $(CHECKPOINTS)/ultra_refiner
# PTX target of candle's CUDA kernels: compute_80 PTX is JIT-compiled by the driver for every newer GPU
# (A100 80, A10/RTX 30xx 86, L4/RTX 40xx 89, H100/H200 90); 90 gives a Hopper-only build.
CUDA_COMPUTE_CAP ?= 80
CUDA_TARGET_DIR  ?= target/cuda
GPU_CHECK_OUT    ?= gpu-check-results
BENCH_OUT    ?= bench-results

.PHONY: build build-cuda install-cuda-toolkit gpu-check gpu-bundle test lint fmt bench demo clean submit prepare augment \
	phase1 phase2 phase3 evaluate all fetch-weights

build:
	$(CARGO) build --release --workspace --bins

# CUDA build of every binary into $(CUDA_TARGET_DIR)/release (not part of `make test`/CI). Needs nvcc
# (`make install-cuda-toolkit` on Debian), no GPU and no driver: CUDA libraries are loaded at run time.
build-cuda:
	CARGO="$(CARGO)" CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) CARGO_TARGET_DIR=$(CUDA_TARGET_DIR) scripts/build-cuda.sh

# Debian: CUDA 11.8 toolkit from the non-free component (root; see README "CUDA").
install-cuda-toolkit:
	scripts/install-cuda-toolkit.sh

# Device checks on a GPU machine (SPEC §17.1): CPU/GPU agreement, bf16 encoder, one epoch per phase, embedding cache,
# paper-size benchmarks; JSON + summary in $(GPU_CHECK_OUT). No network and no build: run `make build-cuda` first
# (or copy its binaries) and pass FIXTURES=<dir> if ../shared/fixtures is not beside the checkout.
gpu-check:
	OUT=$(GPU_CHECK_OUT) scripts/gpu-check.sh $(CUDA_TARGET_DIR)/release $(FIXTURES)

# gpu-bundle.tar.xz: stripped CUDA binaries + the fixtures the device checks read, for a GPU machine without toolchain.
gpu-bundle:
	scripts/gpu-bundle.sh $(CUDA_TARGET_DIR)/release $(FIXTURES)

# Unit, parity and integration tests on CPU, offline. Release profile: the numeric tests and CLI runs need it.
test:
	$(CARGO) build --release --workspace --bins
	$(CARGO) test --release --workspace

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --release --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# The whole method on the built-in phantom data, tiny preset, CPU (README's first command).
demo: build
	scripts/demo.sh

prepare: build
	$(RELEASE)/ultrarefiner prepare datasets --raw-root $(RAW_ROOT) --output-root $(DATA_ROOT) --datasets $(DATASETS)
	$(RELEASE)/ultrarefiner prepare verify --output-root $(DATA_ROOT)

augment: build
	$(RELEASE)/ultrarefiner augment synthetic --processed-root $(DATA_ROOT) --datasets $(DATASETS) --output-root $(AUG_ROOT) \
	  --resume $(AUGMENT_ARGS)

# Every training target passes --resume auto: a finished run exits at once, an interrupted one continues.
phase1: build
	$(RELEASE)/phase1 --config $(CONFIG) --data-root $(DATA_ROOT) --dataset $(DATASET) --fold $(FOLD) \
	  --output-dir $(P1_DIR) --device $(DEVICE) --resume auto $(PHASE1_ARGS)

# One SAM refiner for all DATASETS (SAM_CHECKPOINT: a fetch alias such as medsam-vit-b, or a path).
phase2: build
	$(RELEASE)/phase2 --config $(CONFIG) --data-root $(AUG_ROOT) --processed-root $(DATA_ROOT) --dataset $(P2_RUN) \
	  --sam-checkpoint $(SAM_CHECKPOINT) --output-dir $(P2_DIR) --device $(DEVICE) --resume auto $(PHASE2_ARGS)

phase3: build
	$(RELEASE)/phase3 --config $(CONFIG) --data-root $(DATA_ROOT) --dataset $(DATASET) --fold $(FOLD) \
	  --transunet-checkpoint $(P1_DIR)/$(DATASET)/fold_$(FOLD)/best.safetensors \
	  --sam-checkpoint $(P2_DIR)/$(P2_RUN)/best_sam.safetensors \
	  --output-dir $(P3_DIR) --device $(DEVICE) --resume auto $(PHASE3_ARGS)

# Test split of each dataset in DATASETS with the fold ensemble (mean probability) of its Phase 3 models over FOLDS.
evaluate: build
	@for ds in $(DATASETS); do \
	  $(RELEASE)/ultrarefiner evaluate --config $(CONFIG) --data-root $(DATA_ROOT) --datasets $$ds --split test \
	    --ensemble "$(P3_DIR)/$$ds/fold_{k}/best.safetensors" --folds $(shell echo $(FOLDS) | tr ' ' ',') \
	    --output-dir $(RESULTS)/$$ds/test_evaluation --visualize --device $(DEVICE) || exit $$?; \
	done

# The whole study: every DATASET x FOLD through Phases 1 and 3, one Phase 2 in between, then evaluation.
# Rerunning it is cheap: finished runs are skipped by --resume auto, unfinished ones continue.
all: build
	@for ds in $(DATASETS); do for k in $(FOLDS); do \
	  $(MAKE) --no-print-directory phase1 DATASET=$$ds FOLD=$$k || exit $$?; \
	done; done
	$(MAKE) --no-print-directory augment
	$(MAKE) --no-print-directory phase2
	@for ds in $(DATASETS); do for k in $(FOLDS); do \
	  $(MAKE) --no-print-directory phase3 DATASET=$$ds FOLD=$$k || exit $$?; \
	done; done
	$(MAKE) --no-print-directory evaluate

# Pretrained weights into weights/ (hub cache or network; `ultrarefiner fetch --help` lists aliases and --from-file).
fetch-weights: build
	$(RELEASE)/ultrarefiner fetch sam-vit-b
	$(RELEASE)/ultrarefiner fetch medsam-vit-b
	$(RELEASE)/ultrarefiner fetch r50-vit-b16

bench: build
	mkdir -p $(BENCH_OUT)
	for w in sgemm-2048 bilinear-224-1024-fwd-bwd loader-224 prepare-busi-sample; do \
	  $(RELEASE)/ultrarefiner bench --workload $$w --device $(DEVICE) | tee $(BENCH_OUT)/$$w.json; \
	done

clean:
	$(CARGO) clean

# Slurm job arrays (SPEC §14): `make submit DRY_RUN=1 SUBMIT_ARGS="--phases 0,1,2,3 --parallel-p2"`.
# No dependency on `build`: a login node may not be able to build with CUDA.
submit:
	slurm/submit.sh $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(SUBMIT_ARGS)
