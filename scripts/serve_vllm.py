"""Serve every task of a loramix mixture with vLLM's multi-LoRA server and check each answer against loramix.

Steps (see recipes/serve_vllm.md):

1. export every task as a PEFT LoRA adapter at one rank (``loramix export --all-tasks``; done here when
   ``--exports`` does not exist yet);
2. start ``vllm serve BASE --enable-lora --max-lora-rank R --max-loras N --lora-modules task=dir ...`` with
   the ``--max-lora-rank`` the export's manifest names;
3. send one greedy completion request per task (the LoRA module is the task's name) and compare the tokens
   with loramix's own greedy ``generate`` of the unmerged mixture for that task;
4. write a log (JSON + Markdown) with each task's prompt, both answers and whether they match.

    python scripts/serve_vllm.py --adapter runs/smollm2_generation/adapter --exports runs/vllm_exports \\
        --prompt "2 + 3 =" --out benchmarks/results

vLLM on PyPI runs on CUDA only; without it the script stops with that reason (``--print-command`` still
prints the server command).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_PROMPT = "Question: what is 12 plus 7? Answer:"


def vllm_unavailable_reason() -> str | None:
    """Why vLLM cannot run here (no CUDA device, vLLM not installed), or ``None`` when it can."""
    import torch

    if not torch.cuda.is_available():
        return "vLLM's multi-LoRA server needs a CUDA GPU and none is available"
    if importlib.util.find_spec("vllm") is None:
        return "vLLM is not installed (pip install vllm, CUDA only)"
    return None


def read_manifest(exports: Path) -> dict[str, Any]:
    """The manifest ``loramix export --all-tasks`` writes (task -> subdirectory, vLLM rank)."""
    return json.loads((exports / "loramix_exports.json").read_text())


def server_command(
    base_model: str, exports: Path, port: int, dtype: str = "auto", extra: list[str] | None = None
) -> list[str]:
    """The ``vllm serve`` command serving every exported task as a LoRA module named after the task."""
    manifest = read_manifest(exports)
    rank = manifest.get("vllm_max_lora_rank")
    if rank is None:
        raise ValueError(f"{exports}: the exports' rank exceeds every --max-lora-rank vLLM accepts")
    modules = [f"{task}={(exports / folder).resolve()}" for task, folder in manifest["tasks"].items()]
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", base_model,
        "--port", str(port),
        "--dtype", dtype,
        "--enable-lora",
        "--max-lora-rank", str(rank),
        "--max-loras", str(len(modules)),
        "--lora-modules", *modules,
        *(extra or []),
    ]  # fmt: skip


def _post(url: str, payload: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(url, json.dumps(payload).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def wait_for_server(port: int, process: subprocess.Popen, timeout: float = 900.0) -> None:
    """Poll ``/health`` until the server answers; raise if it exits or takes longer than ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"vllm exited with code {process.returncode} before answering")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                return
        except OSError:
            time.sleep(2.0)
    raise TimeoutError(f"vllm did not answer on port {port} within {timeout:.0f} s")


def loramix_answers(
    adapter: str, base_model: str | None, prompts: dict[str, str], max_tokens: int, dtype: str
) -> dict[str, list[int]]:
    """loramix's own greedy tokens of each task's prompt (the unmerged mixture, routed by the task)."""
    import torch

    from loramix.train.export import load_adapter

    loaded = load_adapter(adapter, base_model=base_model)
    model = loaded.model.to("cuda" if torch.cuda.is_available() else "cpu")
    if dtype in ("bfloat16", "float16", "float32"):
        model = model.to(getattr(torch, dtype))
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else loaded.tokenizer.eos_token_id
    answers = {}
    for task, prompt in prompts.items():
        inputs = loaded.tokenizer(prompt, return_tensors="pt").to(model.device)
        with torch.no_grad():
            output = model.generate(
                **inputs, task_ids=[task], max_new_tokens=max_tokens, do_sample=False, pad_token_id=pad
            )
        answers[task] = output[0, inputs["input_ids"].shape[1] :].tolist()
    return answers


def serve_and_check(
    adapter: str,
    exports: Path,
    base_model: str | None = None,
    prompts: dict[str, str] | None = None,
    max_tokens: int = 32,
    port: int = 8013,
    dtype: str = "float32",
    log: Path | None = None,
) -> dict[str, Any]:
    """Export (if needed), serve every task with vLLM, query each, compare with loramix; return the log.

    Returns:
        ``{"tasks": {task: {"prompt", "vllm", "loramix", "match", "common_prefix"}}, "command": [...], ...}``.

    Raises:
        RuntimeError: vLLM cannot run here (the reason), or the server failed.
    """
    reason = vllm_unavailable_reason()
    if reason:
        raise RuntimeError(reason)
    from loramix.train.export import export_adapter, load_adapter

    if not exports.exists():
        export_adapter(load_adapter(adapter, base_model=base_model), exports)
    manifest = read_manifest(exports)
    base = base_model or next(iter(manifest["records"].values()))["base_model_name_or_path"]
    prompts = prompts or {task: DEFAULT_PROMPT for task in manifest["tasks"]}
    expected = loramix_answers(adapter, base_model, prompts, max_tokens, dtype)
    command = server_command(base, exports, port, dtype)
    process = subprocess.Popen(command, stdout=sys.stderr, stderr=sys.stderr)
    results: dict[str, Any] = {}
    try:
        wait_for_server(port, process)
        for task, prompt in prompts.items():
            payload = {
                "model": task,
                "prompt": prompt,
                "max_tokens": max_tokens,
                "temperature": 0.0,
                "return_tokens_as_token_ids": True,
                "logprobs": 1,
            }
            choice = _post(f"http://127.0.0.1:{port}/v1/completions", payload)["choices"][0]
            tokens = [int(token.split(":")[-1]) for token in choice["logprobs"]["tokens"]]
            mine = expected[task]
            prefix = next((i for i, (a, b) in enumerate(zip(tokens, mine, strict=False)) if a != b), None)
            results[task] = {
                "prompt": prompt,
                "vllm": choice["text"],
                "vllm_tokens": tokens,
                "loramix_tokens": mine,
                "match": tokens == mine,
                "common_prefix": min(len(tokens), len(mine)) if prefix is None else prefix,
            }
    finally:
        process.terminate()
        process.wait(timeout=60)
    report = {"command": command, "dtype": dtype, "max_tokens": max_tokens, "tasks": results}
    if log is not None:
        log.mkdir(parents=True, exist_ok=True)
        (log / "vllm_serving.json").write_text(json.dumps(report, indent=2) + "\n")
        lines = ["# vLLM multi-LoRA serving of every task against loramix's own generation", ""]
        lines += ["| task | match | common prefix | vLLM answer |", "|---|---|---:|---|"]
        lines += [
            f"| {task} | {row['match']} | {row['common_prefix']} | {row['vllm']!r} |" for task, row in results.items()
        ]
        (log / "vllm_serving.md").write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve every task of a mixture with vLLM and check the answers.")
    parser.add_argument("--adapter", required=True, help="the saved mixture (loramix train or save_pretrained)")
    parser.add_argument("--exports", required=True, help="its --all-tasks export (written here if absent)")
    parser.add_argument("--base-model", help="the base model directory (default: the exports' records)")
    parser.add_argument("--prompt", action="append", help="TASK=PROMPT (repeatable; default: one prompt for all)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--port", type=int, default=8013)
    parser.add_argument("--dtype", default="float32", help="vLLM's --dtype, also used for loramix's generation")
    parser.add_argument("--out", help="where vllm_serving.json and .md go")
    parser.add_argument("--print-command", action="store_true", help="print the vllm serve command and stop")
    args = parser.parse_args(argv)
    exports = Path(args.exports)
    if args.print_command:
        base = args.base_model or next(iter(read_manifest(exports)["records"].values()))["base_model_name_or_path"]
        print(" ".join(server_command(base, exports, args.port, args.dtype)))
        return 0
    prompts = dict(item.split("=", 1) for item in args.prompt) if args.prompt else None
    try:
        report = serve_and_check(
            args.adapter, exports, args.base_model, prompts, args.max_tokens, args.port, args.dtype,
            Path(args.out) if args.out else None,
        )  # fmt: skip
    except RuntimeError as error:
        print(f"serve_vllm: {error}", file=sys.stderr)
        return 2
    for task, row in report["tasks"].items():
        print(f"{task}: {'match' if row['match'] else 'DIFFERS'} ({row['common_prefix']} tokens agree)")
    return 0 if all(row["match"] for row in report["tasks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
