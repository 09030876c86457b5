"""The throughput benchmark behind jobs/benchmark.py: timed paths, what they measure
(memory, device busy time, FLOPs), the pixel check, history and the report.

Nothing here imports ray: the Ray Data timed path is jobs/raydata/benchmark.py, handed
to `suite.run_throughput` by the job.
"""
