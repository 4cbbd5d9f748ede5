#!/bin/bash
# Nsight Compute on the split-KV attention kernel at the seed's mean step (bench/attn_sweep.py --one 32,32,1,-,
# head-major; float8 with its shared prefix, then bf16 without it: the third launch of each process), when the
# device has ncu: speed of light, occupancy, warp stall reasons, memory workload, launch stats -> $OUT/ncu_*.txt.
#   run (device tool): bash bench/ncu_attn.sh      carry: [".whl"]
source bench/device_env.sh  # $OUT, PYTHONPATH
N=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ -z "$N" ]; then echo "no ncu on this machine"; exit 0; fi
for args in "--fp8 --head-major" "--head-major"; do
  name=$(echo "$args" | tr -d '-' | tr ' ' '_')
  timeout 200 "$N" --kernel-name split_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
    --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \
    python3 bench/attn_sweep.py --one 32,32,1,- $args 2>&1 | grep -v "^==PROF==" | tail -150 > "$OUT/ncu_$name.txt"
  tail -5 "$OUT/ncu_$name.txt"
done
