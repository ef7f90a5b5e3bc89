"""Long-sequence generation throughput benchmark; see ``llmq.kv.bench`` (same as ``llmq bench``).

    python scripts/bench_generate.py                         # CPU: SmolLM2-135M, context 256 (about a minute)
    python scripts/bench_generate.py --contexts 1024 32768   # CUDA: Llama-7B-shaped random model
"""

from llmq.kv.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
