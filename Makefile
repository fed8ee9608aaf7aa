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
CUDA_COMPUTE_CAP ?= 90
BENCH_OUT    ?= bench-results

.PHONY: build build-cuda test lint fmt bench demo clean submit prepare augment phase1 fetch-weights

build:
	$(CARGO) build --release --workspace --bins

build-cuda:
	CUDA_COMPUTE_CAP=$(CUDA_COMPUTE_CAP) $(CARGO) build --release --workspace --bins --features cuda

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
	$(RELEASE)/ultrarefiner augment synthetic --processed-root $(DATA_ROOT) --datasets $(DATASETS) --output-root $(AUG_ROOT)

phase1: build
	$(RELEASE)/phase1 --config $(CONFIG) --data-root $(DATA_ROOT) --dataset $(DATASET) --fold $(FOLD) \
	  --device $(DEVICE) --resume auto

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
