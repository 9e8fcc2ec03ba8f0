#!/usr/bin/env bash
# The main job on two CPU cores, from nothing: install, build an offline English corpus (or use yours),
# train a sentencepiece tokenizer, preprocess into sharded Arrow files, and verify them.
#
#   bash examples/quickstart_cpu.sh                      # embedded default corpus
#   bash examples/quickstart_cpu.sh --input my.jsonl     # your own corpus (JSONL with "text", or .txt, .gz ok)
#   bash examples/quickstart_cpu.sh --work-dir /tmp/qs   # where everything is written (default runs/quickstart)
set -euo pipefail
cd "$(dirname "$0")/.."

WORK_DIR=runs/quickstart
INPUTS=()
VOCAB_SIZE=8000
while [ $# -gt 0 ]; do
  case "$1" in
    --input) shift; while [ $# -gt 0 ] && [[ "$1" != --* ]]; do INPUTS+=("$1"); shift; done ;;
    --work-dir) WORK_DIR="$2"; shift 2 ;;
    --vocab-size) VOCAB_SIZE="$2"; shift 2 ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1 (see --help)" >&2; exit 2 ;;
  esac
done

echo "== 1/4 install"
bash tools/install.sh

mkdir -p "$WORK_DIR"
if [ ${#INPUTS[@]} -eq 0 ]; then
  echo "== 2/4 corpus: Python standard-library docstrings (offline)"
  python tools/make_offline_corpus.py --output "$WORK_DIR/raw/stdlib_docs.jsonl"
  INPUTS=("$WORK_DIR/raw/stdlib_docs.jsonl")
else
  echo "== 2/4 corpus: ${INPUTS[*]}"
fi

echo "== 3/4 tokenizer: sentencepiece unigram, vocabulary $VOCAB_SIZE"
python tools/train_tokenizer.py --input "${INPUTS[@]}" --model-prefix "$WORK_DIR/tokenizer/spm" \
  --vocab-size "$VOCAB_SIZE"

echo "== 4/4 preprocess into Arrow shards"
python tools/preprocess_data.py --input "${INPUTS[@]}" --output-dir "$WORK_DIR/data" \
  --tokenizer-type sentencepiece --tokenizer-model "$WORK_DIR/tokenizer/spm.model" \
  --workers 2 --split-sentences --reject-file "$WORK_DIR/data_rejects.jsonl" --overwrite
python tools/verify_data.py "$WORK_DIR/data"

echo "done: data in $WORK_DIR/data (pretraining arrives with the [train] issue)"
