#!/usr/bin/env bash
# The Docker image built and run for real (`make docker-check`; not part of `make test`: CI has no
# Docker daemon). Builds the `cpu` target of the Dockerfile and, inside the image, runs the demo, a
# torchrun DP=2 training run on a mounted volume, its --resume, an export loaded with transformers and
# the bad-input refusal; prints one summary line; exit 0 only if every check passes.
#
# Every container runs as the image's default (non-root) user with a read-only root file system, a
# tmpfs /tmp and one volume at /work: a write anywhere else fails the check.
#
# Environment:
#   BASE     the cpu target's base image (default python:3.11-slim-bookworm). When it is neither
#            present nor pullable (no registry: an air-gapped machine), a local Debian base is used
#            instead, built once with debootstrap (root) and `docker import`: LOCAL_BASE from MIRROR.
#   IMAGE    the tag built (default megatron-dta:cpu)
#   KEEP=1   keep the check's volume (its runs and export) instead of removing it
# pip inside the build gets this machine's settings (index, extra http(s) indexes, CA bundle) as
# build secrets; the torch CPU wheel is copied into docker/wheels/ from pip's find-links directories.
set -uo pipefail
cd "$(dirname "$0")/.."

BASE=${BASE:-python:3.11-slim-bookworm}
LOCAL_BASE=${LOCAL_BASE:-megatron-dta-base:bookworm}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
IMAGE=${IMAGE:-megatron-dta:cpu}
CONFIGS=/opt/megatron_dta/configs # where the image keeps the project's configs

say() { echo "docker_check: $*" >&2; }
die() {
  say "$*"
  exit 1
}
tmp=$(mktemp -d)
started_dockerd=
volume=
cleanup() {
  [[ -n $volume && -z ${KEEP:-} ]] && docker volume rm -f "$volume" > /dev/null
  if [[ -n $started_dockerd ]]; then
    kill "$started_dockerd" && wait "$started_dockerd" 2> /dev/null
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

# -- the daemon: use a running one, or start one (root only) and stop it again at the end
if ! docker info > /dev/null 2>&1; then
  [[ $(id -u) == 0 ]] && command -v dockerd > /dev/null \
    || die "no Docker daemon running: start one (as root: dockerd > /var/log/dockerd.log 2>&1 &)"
  say "starting dockerd (log: $tmp/dockerd.log)"
  dockerd > "$tmp/dockerd.log" 2>&1 &
  started_dockerd=$!
  for _ in $(seq 60); do docker info > /dev/null 2>&1 && break || sleep 1; done
  docker info > /dev/null 2>&1 || die "dockerd did not come up: $(tail -3 "$tmp/dockerd.log")"
fi

# -- a BuildKit builder: the Dockerfile uses RUN --mount and skips the other target's stages. Clients
# from Docker 23 on build with BuildKit through the buildx plugin; older clients have it built in.
build=()
if docker buildx version > /dev/null 2>&1; then
  build=(docker build)
else
  for client in $(type -ap docker); do
    version=$("$client" version --format '{{.Client.Version}}' 2> /dev/null)
    if [[ ${version%%.*} =~ ^[0-9]+$ ]] && ((${version%%.*} < 23)); then
      build=(env DOCKER_BUILDKIT=1 "$client" build)
      break
    fi
  done
fi
((${#build[@]})) || die "no BuildKit: install the docker buildx plugin (docker-buildx-plugin)"

# -- the base: BASE if present or pullable, else the local debootstrap base (built once)
if docker image inspect "$BASE" > /dev/null 2>&1 || docker pull -q "$BASE" > /dev/null 2>&1; then
  say "base $BASE"
elif docker image inspect "$LOCAL_BASE" > /dev/null 2>&1; then
  say "base $BASE cannot be pulled: reusing the local base $LOCAL_BASE"
  BASE=$LOCAL_BASE
else
  say "base $BASE cannot be pulled: building the local base $LOCAL_BASE (debootstrap from $MIRROR)"
  [[ $(id -u) == 0 ]] && command -v debootstrap > /dev/null \
    || die "building $LOCAL_BASE needs root and debootstrap (apt-get install debootstrap)"
  start=$SECONDS
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$tmp/rootfs" "$MIRROR" > "$tmp/debootstrap.log" 2>&1 \
    || die "debootstrap failed: $(tail -3 "$tmp/debootstrap.log")"
  rm -rf "$tmp"/rootfs/var/cache/apt/archives/*.deb "$tmp"/rootfs/var/lib/apt/lists/*
  tar -C "$tmp/rootfs" -c . | docker import -c 'CMD ["/bin/bash"]' - "$LOCAL_BASE" > /dev/null \
    || die "docker import of the base failed"
  rm -rf "$tmp/rootfs"
  say "built $LOCAL_BASE in $((SECONDS - start)) s"
  BASE=$LOCAL_BASE
fi

# -- the torch CPU wheel for the base's python, from pip's find-links directories
torch_version=$(sed -n 's/^ *"torch==\([^"]*\)".*/\1/p' pyproject.toml)
pytag=$(docker run --rm "$BASE" python3 -c 'import sys; print("cp%d%d" % sys.version_info[:2])') \
  || die "base $BASE has no python3"
wheel_name="torch-${torch_version}+cpu-${pytag}-${pytag}-*linux*_x86_64.whl"
if ! compgen -G "docker/wheels/$wheel_name" > /dev/null; then
  find_links="${PIP_FIND_LINKS:-} $(python3 -m pip config get global.find-links 2> /dev/null)"
  found=$(for d in $find_links; do compgen -G "${d#file://}/$wheel_name"; done | head -1)
  [[ -n $found ]] || die "no $wheel_name in docker/wheels/ or pip's find-links ($find_links): pip download \
torch==$torch_version --index-url https://download.pytorch.org/whl/cpu --no-deps -d docker/wheels"
  cp "$found" docker/wheels/
fi

# -- pip's settings for the build, passed as secrets (never stored in a layer)
pip_get() { python3 -m pip config get "global.$1" 2> /dev/null; }
index=${PIP_INDEX_URL:-$(pip_get index-url)}
extra=$(for u in ${PIP_EXTRA_INDEX_URL:-$(pip_get extra-index-url)}; do [[ $u == http* ]] && echo "$u"; done)
cert=${PIP_CERT:-$(pip_get cert)}
cert=${cert:-/etc/ssl/certs/ca-certificates.crt}
{
  echo "[global]"
  [[ -n $index ]] && echo "index-url = $index"
  [[ -n $extra ]] && echo "extra-index-url = $(echo $extra)"
  [[ -n ${PIP_TRUSTED_HOST:-} ]] && echo "trusted-host = $PIP_TRUSTED_HOST"
  [[ -f $cert ]] && echo "cert = /run/secrets/pip_cert"
} > "$tmp/pip.conf"
secrets=(--secret "id=pip_conf,src=$tmp/pip.conf")
[[ -f $cert ]] && secrets+=(--secret "id=pip_cert,src=$cert")

# -- build
say "building $IMAGE (target cpu, base $BASE)"
start=$SECONDS
"${build[@]}" --target cpu --build-arg "BASE=$BASE" "${secrets[@]}" -t "$IMAGE" . > "$tmp/build.log" 2>&1 \
  || die "build failed: $(tail -20 "$tmp/build.log")"
build_s=$((SECONDS - start))
size_mb=$(($(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000))
base_mb=$(($(docker image inspect -f '{{.Size}}' "$BASE") / 1000000))
say "built $IMAGE in $build_s s: $size_mb MB ($base_mb MB of it the base)"

# -- the checks, each a command in the image and a verdict; all run, then one summary line
volume=$(docker volume create "megatron-dta-check-$$") || die "docker volume create failed"
in_image() { docker run --rm -i --read-only --tmpfs /tmp -v "$volume:/work" "$IMAGE" "$@"; }
passed=()
failed=()
check() { # NAME COMMAND...: pass when the command exits 0; its output goes to $tmp/NAME.log
  local name=$1
  shift
  local start=$SECONDS
  if "$@" > "$tmp/$name.log" 2>&1; then
    passed+=("$name")
    say "ok   $name ($((SECONDS - start)) s)"
  else
    failed+=("$name")
    say "FAIL $name ($((SECONDS - start)) s):"
    tail -15 "$tmp/$name.log" | sed 's/^/    /' >&2
  fi
}

# the image's user is not root, and its root file system is not written (checked again by every run)
user_check() { [[ $(in_image id -u) != 0 ]] && ! in_image touch /opt/megatron_dta/x 2> /dev/null; }

# the demo trains its 6 steps with a falling loss and times dta against dense
demo_check() {
  in_image megatron-dta demo --run-dir /work/runs/demo | tee /dev/stderr | grep -q "^loss went down" \
    && in_image python -c "import json; s=[json.loads(l)['step'] for l in open('/work/runs/demo/metrics.jsonl')]; \
assert s == list(range(1, 7)), s"
}

# DP=2 over gloo for 4 steps, checkpoints at steps 2 and 4, run directory on the volume
dp2=(torchrun --standalone --nproc-per-node 2 -m megatron_dta train --config "$CONFIGS/cpu_2proc_dp2.yaml"
  checkpoint.run_dir=/work/runs/dp2 checkpoint.every=2 logging.progress=lines)
steps_are() { # RUN_DIR N: metrics.jsonl holds steps 1..N once each, losses finite; the newest
  # complete checkpoint is step N's
  in_image python - "$@" << 'EOF'
import json, math, sys
from megatron_dta.checkpoint import latest_complete, step_of
run, n = sys.argv[1], int(sys.argv[2])
rows = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
assert [r["step"] for r in rows] == list(range(1, n + 1)), [r["step"] for r in rows]
assert all(math.isfinite(r["loss"]) for r in rows), [r["loss"] for r in rows]
assert step_of(latest_complete(run)) == n, latest_complete(run)
print(f"steps 1..{n}, losses", [round(r["loss"], 5) for r in rows])
EOF
}
train_check() { in_image "${dp2[@]}" train.steps=4 && steps_are /work/runs/dp2 4; }
# --resume continues from step 4 to 6: it appends steps 5 and 6 and trains nothing twice
resume_check() { in_image "${dp2[@]}" train.steps=6 --resume && steps_are /work/runs/dp2 6; }

# export the step-6 model; transformers loads it, and its log-probs of a sequence equal those of
# megatron-dta started from the export (model.hf_checkpoint), float32 on both sides
export_check() {
  in_image megatron-dta export --run-dir /work/runs/dp2 --hf-out /work/hf || return 1
  in_image python - << 'EOF' || return 1
import json, torch, transformers
model = transformers.AutoModelForCausalLM.from_pretrained("/work/hf", dtype=torch.float32)
ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])[:, 0]
row = {"input_ids": ids[0].tolist(), "loss_mask": [0] + [1] * 39, "advantages": 1.0}
open("/work/probe.jsonl", "w").write(json.dumps(row) + "\n")
json.dump([0.0] + logp.tolist(), open("/work/probe_hf.json", "w"))
print(type(model).__name__, sum(p.numel() for p in model.parameters()), "parameters")
EOF
  in_image megatron-dta logprobs --rollouts /work/probe.jsonl --out /work/probe_dta.jsonl \
    model.preset=null model.hf_checkpoint=/work/hf train.dtype=float32 || return 1
  in_image python - << 'EOF'
import json
hf = json.load(open("/work/probe_hf.json"))
dta = json.loads(open("/work/probe_dta.jsonl").readline())["logprobs"]
diff = max(abs(a - b) for a, b in zip(hf, dta))
print(f"max |log-prob difference| transformers vs megatron-dta: {diff:.2e}")
assert len(hf) == len(dta) == 40 and diff < 1e-4, diff  # float32 round-off over a 4-layer model
EOF
}

# bad input: refused with exit code 2 and one line on stderr, no traceback
bad_input_check() {
  local rc=0
  in_image megatron-dta train train.steps=0 2> "$tmp/bad.err" > /dev/null || rc=$?
  cat "$tmp/bad.err"
  [[ $rc == 2 && $(wc -l < "$tmp/bad.err") == 1 ]] && ! grep -q Traceback "$tmp/bad.err"
}

check non-root-read-only user_check
check demo demo_check
check train-dp2 train_check
check resume resume_check
check export-hf-load export_check
check bad-input bad_input_check

summary="${#passed[@]}/$((${#passed[@]} + ${#failed[@]})) checks passed in $IMAGE (base $BASE, \
$size_mb MB, built in $build_s s): ${passed[*]}${failed:+; FAILED: ${failed[*]}}"
if ((${#failed[@]})); then
  echo "docker_check: FAIL $summary"
  exit 1
fi
echo "docker_check: PASS $summary"
