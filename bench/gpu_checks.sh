#!/usr/bin/env bash
# The GPU checks of the speed issue as one prepared script, for a lent GPU machine that has torch with CUDA but
# none of mmpipe's other dependencies and no network; files reach it with the working tree, 64 MiB per call.
#
#   bench/gpu_checks.sh pack DATASET INSTRUCTIONS
#       here: wheels of what bench/mfu.py imports besides torch, for the GPU machine's Python (3.12), and the
#       two ingested sample datasets (as `mmpipe demo` leaves them under $MMPIPE_HOME/datasets), as a tar cut
#       into parts of 60 MB: gpu-kit/part-aa, -ab, ... (about 160 MB; ignored by git)
#   bench/gpu_checks.sh receive
#       there, once per part, each call carrying one: keeps the part in /tmp/mmpipe-gpu-kit (it stays while
#       the machine is warm: send the parts back to back)
#   bench/gpu_checks.sh engine
#       there, after the last part: joins the parts, installs the wheels beside its torch and runs bench/mfu.py
#       on ViT-B/16 CLIP and LLaVA-base in the
#       training workers' engine, bf16, eager and compiled (torch.compile through DeepSpeed's engine), writing
#       $OUT/benchmarks.md; paste its section into docs/benchmarks.md.
# The whole stack on the GPU (bench/gpu.py: fit() with Ray Train, Ray Data, checkpoints, MLflow) needs Ray's
# wheel too (about 79 MB: two calls, STACK_NOTES), which this script does not send yet.
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=gpu-kit
THERE=/tmp/mmpipe-gpu-kit

pack() {
    local dataset=$1 instructions=$2
    rm -rf "$KIT" && mkdir -p "$KIT/wheels" "$KIT/datasets"
    # DeepSpeed publishes no wheel: build its pure-Python one here.
    .venv/bin/pip wheel --quiet --no-deps --wheel-dir "$KIT/wheels" "deepspeed==$(.venv/bin/python -c \
        'from importlib.metadata import version; print(version("deepspeed"))')"
    .venv/bin/pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --dest "$KIT/wheels" "pyarrow>=25,<27" "tokenizers>=0.20" "safetensors>=0.4" pillow numpy \
        "transformers==5.25.*" "peft==0.21.*" "vector-quantize-pytorch==1.32.*" rich psutil "filelock>=3.12" \
        "pydantic>=2" hjson py-cpuinfo msgpack ninja "universal-pathlib>=0.3,<0.4" fsspec
    rm -f "$KIT"/wheels/torch-*.whl "$KIT"/wheels/nvidia_*.whl "$KIT"/wheels/triton-*.whl  # the machine's own
    for pair in "captions:$dataset" "instructions:$instructions"; do  # without derived versions
        local into="$KIT/datasets/${pair%%:*}"
        mkdir -p "$into" && (cd "${pair#*:}" && tar cf - --exclude ./derived .) | tar xf - -C "$into"
    done
    tar cf - -C "$KIT" wheels datasets | split -b 60M - "$KIT/part-"
    rm -rf "$KIT/wheels" "$KIT/datasets"
    ls -s --block-size=M "$KIT"
}

receive() {
    mkdir -p "$THERE" && cp "$KIT"/part-* "$THERE"/ && ls "$THERE"
}

engine() {
    rm -rf "$KIT" && mkdir -p "$KIT" && cat "$THERE"/part-* | tar xf - -C "$KIT"
    python3 -m venv --system-site-packages "$KIT/venv"  # the machine's torch with CUDA stays
    "$KIT/venv/bin/pip" install --quiet --no-index --find-links "$KIT/wheels" deepspeed pyarrow tokenizers \
        safetensors pillow numpy transformers peft vector-quantize-pytorch rich psutil filelock pydantic \
        universal-pathlib
    "$KIT/venv/bin/pip" install --quiet --no-deps --no-build-isolation --ignore-requires-python -e .
    "$KIT/venv/bin/python" bench/mfu.py --models clip-vit-b16 llava-base --variants eager compiled \
        --dataset "$KIT/datasets/captions" --instructions "$KIT/datasets/instructions" --steps 60 --warmup 20 \
        --out "${OUT:-.}/benchmarks.md"
}

case "${1:-}" in
    pack) shift; pack "$@" ;;
    receive) receive ;;
    engine) engine ;;
    *) echo "usage: bench/gpu_checks.sh pack DATASET INSTRUCTIONS | receive | engine" >&2; exit 2 ;;
esac
