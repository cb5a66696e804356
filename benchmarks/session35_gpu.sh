#!/usr/bin/env bash
# For the next session: what the thirty-third and thirty-fourth sessions could not run (no
# machine for most of both). PART is a comma-separated list of session33_gpu.sh's parts:
#   bench:    end to end with PDL on by default, Llama-3-8B shapes, 8000-token prompt, batch 1
#             (~250 s; the session 32 numbers are without PDL).
#   bench16:  the same at batch 16 (~250 s).
#   pdl32:    probe_e2e_long.py --pdl at 32 layers, plain against PDL, A/B/B/A (~330 s).
# e.g. PART=bench,bench16 bash benchmarks/session35_gpu.sh (two calls if the budget is short).
exec bash benchmarks/session33_gpu.sh
