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

.PHONY: build build-cuda test lint fmt bench demo clean submit

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

bench: build
	mkdir -p $(BENCH_OUT)
	for w in sgemm-2048; do \
	  $(RELEASE)/ultrarefiner bench --workload $$w --device $(DEVICE) | tee $(BENCH_OUT)/$$w.json; \
	done

clean:
	$(CARGO) clean

# Slurm job arrays (SPEC §14): `make submit DRY_RUN=1 SUBMIT_ARGS="--phases 0,1,2,3 --parallel-p2"`.
# No dependency on `build`: a login node may not be able to build with CUDA.
submit:
	slurm/submit.sh $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run) $(SUBMIT_ARGS)
