#!/usr/bin/env bash
# The README's "Getting started" commands, run as written in a fresh clone of this checkout's HEAD, in one shell (so
# that `source .venv/bin/activate` holds for the commands after it), each one timed.
#   bash .ci/readme_quickstart.sh                  # SDQ_CIFAR10_ROOT from the environment; make test not run
#   QUICKSTART_MAKE_TEST=1 bash .ci/readme_quickstart.sh
# Two lines cannot run verbatim and are handled as printed: `export SDQ_CIFAR10_ROOT=/path/to/cifar10` keeps the
# environment's value (without one, the CIFAR-10 commands are skipped), and `make test`, which CI runs in the
# checkout already, runs only with QUICKSTART_MAKE_TEST=1.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
work="${QUICKSTART_DIR:-$(mktemp -d)}"
git clone -q "$repo" "$work/sdq_lightning"
script="$work/quickstart.sh"
python3 - "$work/sdq_lightning/README.md" "$script" <<'EOF'
import re, shlex, sys
text = open(sys.argv[1]).read()
section = text[text.index("## Getting started"):]
block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
lines = ["set -eo pipefail", 'tick() { date +%s.%N; }']
for raw in block.splitlines():
    command = raw.split("  #")[0].split(" #")[0].strip() if not raw.lstrip().startswith("#") else ""
    if not command:
        continue
    if command.startswith("export SDQ_CIFAR10_ROOT="):
        lines.append('echo "== export SDQ_CIFAR10_ROOT: kept from the environment (${SDQ_CIFAR10_ROOT:-unset})"')
        continue
    guard = ""
    if "SDQ_CIFAR10_ROOT" in command:
        guard = 'if [[ -z "${SDQ_CIFAR10_ROOT:-}" ]]; then echo "== skipped (SDQ_CIFAR10_ROOT unset): ' \
                + command.replace('"', "'").replace("$", "\\$") + '"; else '
    if command == "make test":
        guard = 'if [[ "${QUICKSTART_MAKE_TEST:-0}" != 1 ]]; then echo "== skipped (CI runs make test): make test"; else '
    quoted = shlex.quote(command)
    body = f't0=$(tick); echo "== {command}"; {command}; echo "== took $(python3 -c "print(round($(tick) - $t0))") s: "{quoted}'
    lines.append(f"{guard}{body}{'; fi' if guard else ''}")
open(sys.argv[2], "w").write("\n".join(lines) + "\n")
EOF
cd "$work/sdq_lightning"
echo "fresh clone: $PWD ($(git log --oneline -1 | cut -c1-60))"
bash "$script"
