#!/usr/bin/env bash
# Is the README's test command green on a fresh clone, first time, twice in a row, and beside a CPU-bound
# process (issue #21)? Clones this checkout's HEAD into OUT/clone, then:
#   run 1: the README's whole test command (venv, torch, the package, llama.cpp, pytest)
#   run 2: python -m pytest -q again, in the same clone
#   run 3: python -m pytest -q with one busy loop (python3 -c "while True: pass") beside it
# Each run's output and its exit status and wall time go to OUT/run<N>.log; the load average before and
# after run 3 to OUT/run3.load. About 75 min on 2 cores (the llama.cpp build is 4 of them).
# Usage: tools/fresh_clone_tests.sh OUT   (OUT: a folder outside the checkout; emptied first)
set -uo pipefail
OUT=$(realpath -m "${1:?usage: tools/fresh_clone_tests.sh OUT}")
REPO=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$OUT" && mkdir -p "$OUT" && git clone -q "$REPO" "$OUT/clone" && cd "$OUT/clone" || exit 2
git log --oneline -1 > "$OUT/commit"
export DVC_NO_ANALYTICS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1

timed() {  # timed LOG COMMAND...: run it, append its exit status and wall time to LOG
    local log=$1 start=$SECONDS; shift
    "$@" > "$log" 2>&1
    local status=$?
    echo "exit status $status, $((SECONDS - start)) s" >> "$log"
    return $status
}

timed "$OUT/run1.log" bash -c 'python3 -m venv .venv && . .venv/bin/activate && pip install torch==2.13.0 &&
    pip install -c constraints.txt -e ".[dev,tasks,heal]" && tools/build_llama_cpp.sh && python -m pytest -q'
failed=$?
. .venv/bin/activate
timed "$OUT/run2.log" python -m pytest -q || failed=1
python3 -c "while True: pass" & busy=$!
uptime > "$OUT/run3.load"
timed "$OUT/run3.log" python -m pytest -q || failed=1
{ uptime; ps -o pid,etime,time,cmd -p "$busy"; } >> "$OUT/run3.load"
kill "$busy"
tail -qn 1 "$OUT"/run[123].log
exit $failed
