"""Serve a finetuned LoRA adapter unmerged and check it answers like the merged export of the same run.

    .venv/bin/python scripts/lora_serve_check.py --run results/finetune-demo/model --data DATA.jsonl --num 20

``loom finetune --lora`` writes the merged model to OUTPUT and the adapter alone to OUTPUT/adapter. This loads the
base model with the adapter as a LoRA request (``enable_lora``) and the merged folder as a plain model, answers the
first ``--num`` prompts of ``--data`` (a JSONL with "prompt", "instruction" or "messages") greedily through the chat
template with both, and prints how many answers are identical; the exit code is 1 unless all are. Writes JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from loom import LLM, LoRARequest, SamplingParams  # noqa: E402


def conversations(path: Path, num: int) -> list[list[dict]]:
    out = []
    for line in path.read_text().splitlines()[:num]:
        record = json.loads(line)
        if "messages" in record:
            out.append([m for m in record["messages"] if m["role"] != "assistant"])
        else:
            text = record.get("prompt") or record["instruction"]
            if record.get("input"):
                text = f"{text}\n\n{record['input']}"
            out.append([{"role": "user", "content": text}])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the finetune OUTPUT folder (merged model + adapter/)")
    parser.add_argument("--base", default=None, help="base model (default: the adapter's base_model_name_or_path)")
    parser.add_argument("--data", required=True)
    parser.add_argument("--num", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--out", default="results/lora_serve_check.json")
    args = parser.parse_args(argv)
    run = Path(args.run)
    adapter_config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    base = args.base or adapter_config["base_model_name_or_path"]
    chats = conversations(Path(args.data), args.num)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)
    t0 = time.perf_counter()
    merged = [o.outputs[0].text for o in LLM(str(run), kv_cache_memory_gb=0.5).chat(chats, params)]
    llm = LLM(base, enable_lora=True, max_lora_rank=adapter_config["r"], kv_cache_memory_gb=0.5)
    adapter = LoRARequest("adapter", 1, str(run / "adapter"))
    unmerged = [o.outputs[0].text for o in llm.chat(chats, params, lora_request=adapter)]
    base_answers = [o.outputs[0].text for o in llm.chat(chats, params)]
    same = sum(a == b for a, b in zip(merged, unmerged))
    differs_from_base = sum(a != b for a, b in zip(unmerged, base_answers))
    summary = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "run": str(run), "base": str(base),
               "num": len(chats), "identical": same, "differ_from_base": differs_from_base,
               "seconds": round(time.perf_counter() - t0, 1),
               "examples": [{"merged": m, "unmerged": u, "base": b}
                            for m, u, b in list(zip(merged, unmerged, base_answers))[:3]]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2))
    print(f"LoRA served unmerged vs merged export: {same}/{len(chats)} answers identical "
          f"({differs_from_base}/{len(chats)} differ from the base model)")
    return 0 if same == len(chats) else 1


if __name__ == "__main__":
    raise SystemExit(main())
