#!/bin/sh
# slow-job SECONDS: the end-to-end test's `exec` program. A progress line every second, naming
# its own pid (so the test can check the process is gone after a cancel), then a result.
n=${1:-20}
i=0
while [ "$i" -lt "$n" ]; do
  sleep 1
  i=$((i + 1))
  printf '{"progress": %s, "message": "pid %s: step %s of %s"}\n' "$(awk "BEGIN { print $i / $n }")" "$$" "$i" "$n"
done
printf '{"result": {"answer": 42, "slept_s": %s}}\n' "$n"
