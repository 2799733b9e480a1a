#!/bin/bash
# The demo LLaVA trained from the sample corpus's conversation file (ingested like a user's) instead of the
# questions the library derives from the corpus's columns; evaluated on the caption dataset's test split.
# usage: run.sh HOME SAMPLE CAPTIONS OUT
#   HOME: an MMPIPE_HOME whose models:/mmpipe-contrastive/1 is the demo CLIP trained on CAPTIONS
#   SAMPLE: the sample corpus directory (mmpipe sample make), CAPTIONS: its URL list ingested,
#   OUT: where the instruction dataset version goes
set -euo pipefail
export MMPIPE_HOME=$1 HF_HUB_OFFLINE=1
SAMPLE=$2 CAPTIONS=$3 OUT=$4
PORT=$(python3 -c "import json,sys; print(json.load(open('$SAMPLE/sample.json'))['base_url'].rsplit(':', 1)[1])")
mmpipe sample serve "$SAMPLE" --port "$PORT" > /dev/null 2>&1 &
SERVER=$!
trap 'kill $SERVER' EXIT
sleep 2
[ -e "$SAMPLE/conversations.jsonl" ] || python -c "from mmcore.data.synthetic.corpus import write_conversations as w; \
import json; s = json.load(open('$SAMPLE/sample.json'))['spec']; w('$SAMPLE', 2, s['seed'])"
[ -e "$OUT/manifest.json" ] || /usr/bin/time -f "ingest %e s" mmpipe ingest "$SAMPLE/conversations.jsonl" \
    --kind instructions --out "$OUT" --allow-network 127.0.0.1/32
/usr/bin/time -f "train %e s" mmpipe train fusion --dataset "$OUT" --set cluster.executor=here \
    --set parallel.num_workers=1 --set model.parent=models:/mmpipe-contrastive/1 --set tracking.alias=from-file
mmpipe evaluate models:/mmpipe-fusion@from-file --dataset "$CAPTIONS" --suite vqa --suite compositional
