#!/usr/bin/env bash
# The main job: set up, then build the example character (examples/emily.toml) end to end.
#
# On a CUDA machine with real weights (models/sd15.toml or sdxl.toml ready): the full
# workflow - 400 generated images, curation, captions, training, evaluation, report.
# On a CPU-only machine the `cpu-tiny` profile has tiny RANDOM weights: they run every
# stage for real but draw noise, never faces. So the CPU build imports a folder of real
# photos of one person (../shared/realdata/faces/<identity>) in place of generation.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DATA=${LIKENESS_DATA:-data}
PY=.venv/bin/python
best=$($PY -c "from likeness.profiles import best_profile; print(best_profile()[0].name)")
if [ "$best" != "cpu-tiny" ]; then
  echo "main: profile $best on CUDA - full generation of examples/emily.toml" >&2
  exec $PY -m likeness build examples/emily.toml --data "$DATA" --profile "$best" "$@"
fi
REAL=${LIKENESS_REALDATA:-../shared/realdata}
IDENTITY=${LIKENESS_MAIN_IDENTITY:-Angelina_Jolie}
FOLDER="$REAL/faces/$IDENTITY"
echo "main: no CUDA GPU with real weights - using profile cpu-tiny (tiny random weights draw noise, not faces)." >&2
if [ ! -d "$FOLDER" ]; then
  echo "main: $FOLDER not found; set LIKENESS_REALDATA to the shared realdata folder. Without real photos" >&2
  echo "main: a CPU build would curate noise, so it stops here." >&2
  exit 1
fi
# A realistic pool, like a gallery with failures in it: the character's photos plus other people,
# photos without a usable face and group photos, linked (not copied) from the real data.
POOL="$DATA/main-gallery-$IDENTITY"
rm -rf "$POOL" && mkdir -p "$POOL"
link() { for f in "$@"; do [ -f "$f" ] && ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$POOL/$(basename "$(dirname "$f")")__$(basename "$f")"; done; return 0; }
link "$FOLDER"/*
for other in Barack_Obama Katy_Perry George_Clooney; do
  [ "$other" != "$IDENTITY" ] && link $(ls "$REAL/faces/$other"/* 2>/dev/null | head -n 2)
done
link "$REAL"/faces/_negative_no_face/* "$REAL"/faces/_negative_back_of_head/* $(ls "$REAL"/faces/_multi_person/* | head -n 2)
echo "main: building from an imported gallery of real photos instead of generation: $(ls "$POOL" | wc -l) photos," >&2
echo "main: $(ls "$FOLDER" | wc -l) of $IDENTITY plus other people, faceless and group photos (curation must reject those)." >&2
exec $PY -m likeness build examples/emily.toml --data "$DATA" --profile cpu-tiny --import "$POOL" \
  --k 5 --training-steps 20 --checkpoint-every 10 --train-resolution 64 --eval-steps 4 \
  --eval-scene "cooking in a kitchen" --eval-scene "tending a garden" "$@"
