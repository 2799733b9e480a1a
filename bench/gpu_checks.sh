#!/usr/bin/env bash
# The GPU checks of the speed issue as one prepared script, for a lent GPU machine that has Python 3.12, torch
# with CUDA and the scientific stack (numpy, pandas, scipy, scikit-learn, matplotlib, pillow) but none of mmpipe's
# other dependencies and no network; files reach it with the working tree, 64 MiB per call.
#
#   bench/gpu_checks.sh pack
#       here: wheels of what fit() and the benches import besides what that machine has (Ray, MLflow, DeepSpeed
#       built here, transformers, ...) for Python 3.12, and the small sample corpus ingested at 224 px
#       (bench/gpu.py --make-datasets), as a tar cut into parts of 60 MB: gpu-kit/part-aa, -ab, ... (ignored by
#       git; 221 MB in 4 parts when last packed)
#   bench/gpu_checks.sh receive
#       there, once per part, each call carrying one (carry gpu-kit/part-aa, ...): keeps it in /tmp/mmpipe-gpu-kit
#       (it stays while the machine is warm: send the parts back to back)
#   bench/gpu_checks.sh all
#       there, after the last part: `install` (joins the parts, a venv beside the machine's torch, the wheels),
#       then `stack` (bench/gpu.py: ViT-B/16 CLIP and LLaVA-base on it in bf16 through fit(): Ray Train,
#       Ray Data, checkpoints, MLflow registration), then `engine` (bench/mfu.py: the same two models in the
#       workers' engine alone, eager and compiled); each writes its section into $OUT/benchmarks.md, to paste
#       into docs/benchmarks.md. install, stack and engine also run alone (stack and engine after install).
set -euo pipefail
cd "$(dirname "$0")/.."
KIT=gpu-kit
THERE=/tmp/mmpipe-gpu-kit
VENV=$KIT/venv
OUT=${OUT:-.}
# On the machine already (KINDS.md), large, and loose enough in what mmpipe's packages ask of them: not sent.
THERE_ALREADY="torch nvidia_ triton cuda_ numpy pandas scipy scikit_learn matplotlib fonttools kiwisolver pillow
sympy networkx"

pack() {
    rm -rf "$KIT" && mkdir -p "$KIT/wheels"
    # DeepSpeed publishes no wheel: build its pure-Python one here.
    .venv/bin/pip wheel --quiet --no-deps --wheel-dir "$KIT/wheels" "deepspeed==$(.venv/bin/python -c \
        'from importlib.metadata import version; print(version("deepspeed"))')"
    .venv/bin/pip download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --dest "$KIT/wheels" "ray[train,data]==2.60.*" "mlflow>=3.17,<3.18" "pyarrow>=25,<27" "tokenizers>=0.20" \
        "safetensors>=0.4" "transformers==5.25.*" "peft==0.21.*" "vector-quantize-pytorch==1.32.*" rich psutil \
        "filelock>=3.12" "pydantic>=2" hjson py-cpuinfo msgpack ninja "universal-pathlib>=0.3,<0.4" fsspec
    for name in $THERE_ALREADY; do rm -f "$KIT/wheels/$name"*.whl "$KIT/wheels/${name/_/-}"*.whl; done
    .venv/bin/python bench/gpu.py --make-datasets "$KIT/datasets"
    tar cf - -C "$KIT" wheels datasets/captions datasets/instructions | split -b 60M - "$KIT/part-"
    rm -rf "$KIT/wheels" "$KIT/datasets"
    ls -s --block-size=M "$KIT"
}

receive() {
    mkdir -p "$THERE" && cp "$KIT"/part-* "$THERE"/ && ls "$THERE"
}

install() {
    rm -rf "$KIT" && mkdir -p "$KIT" && cat "$THERE"/part-* | tar xf - -C "$KIT"
    python3 -m venv --system-site-packages "$VENV"  # the machine's torch with CUDA stays
    "$VENV/bin/pip" install --quiet --no-index --find-links "$KIT/wheels" deepspeed "ray[train,data]" mlflow \
        pyarrow tokenizers safetensors transformers peft vector-quantize-pytorch rich psutil filelock pydantic \
        universal-pathlib
    "$VENV/bin/pip" install --quiet --no-deps --no-build-isolation --ignore-requires-python -e .
}

stack() {
    timeout 420 "$VENV/bin/python" bench/gpu.py --steps 200 --dataset "$KIT/datasets/captions" \
        --instructions "$KIT/datasets/instructions" --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/stack.log"
}

engine() {
    timeout 300 "$VENV/bin/python" bench/mfu.py --models clip-vit-b16 llava-base --variants eager compiled \
        --dataset "$KIT/datasets/captions" --instructions "$KIT/datasets/instructions" --steps 60 --warmup 20 \
        --out "$OUT/benchmarks.md" 2>&1 | tee "$OUT/engine.log"
}

case "${1:-}" in
    pack) pack ;;
    receive) receive ;;
    install) install ;;
    stack) stack ;;
    engine) engine ;;
    all) install; stack || echo "stack failed: $OUT/stack.log"; engine ;;
    *) echo "usage: bench/gpu_checks.sh pack | receive | install | stack | engine | all" >&2; exit 2 ;;
esac
