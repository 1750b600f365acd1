"""Optional LLM planner: an OpenAI-compatible chat endpoint chooses the next tool.

Configured by ``MATCOUPLE_LLM_URL`` (base URL, e.g. ``http://host:8000/v1``),
``MATCOUPLE_LLM_MODEL`` and ``MATCOUPLE_LLM_API_KEY``. The model sees the request and the
four tools and answers with tool calls; each call runs the same planner step the
deterministic workflow runs (so decisions still follow tau), and its result goes back to
the model. Without an endpoint the deterministic planner runs. Plain HTTP from the
standard library: no extra package.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from fireworks import LaunchPad

from matcouple.coordinate import designrun as dr
from matcouple.errors import MatcoupleError
from matcouple.settings import get_settings


class LLMError(MatcoupleError):
    """The configured LLM endpoint cannot be used; the message says why."""


TOOLS = [
    {"type": "function", "function": {
        "name": "query_database",
        "description": "Known structures of the formula that meet the target, from the "
                       "materials database. Call first.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "generate_structures",
        "description": "Sample a batch of candidate crystals of the composition with the "
                       "diffusion model and filter them (one iteration).",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "predict_properties",
        "description": "Predict the property with Crysformer and its calibrated sigma for "
                       "the latest candidates; confident ones are accepted, the others are "
                       "queued for DFT.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "run_dft",
        "description": "Run the queued DFT relaxations and file their results.",
        "parameters": {"type": "object", "properties": {}}}},
    {"type": "function", "function": {
        "name": "finish",
        "description": "Stop: enough structures were found or more work will not help.",
        "parameters": {"type": "object", "properties": {}}}},
]


def llm_configured() -> bool:
    return bool(get_settings().llm_url)


def chat(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> dict[str, Any]:
    """One chat-completions call; returns the assistant message. Clear errors otherwise."""
    s = get_settings()
    if not s.llm_url.startswith(("http://", "https://")):
        raise LLMError(f"MATCOUPLE_LLM_URL must be an http(s) URL, got {s.llm_url!r}")
    if not s.llm_model:
        raise LLMError("MATCOUPLE_LLM_URL is set but MATCOUPLE_LLM_MODEL is not; name the "
                       "model the endpoint serves")
    body = json.dumps({"model": s.llm_model, "messages": messages, "tools": tools,
                       "tool_choice": "auto", "temperature": 0}).encode()
    headers = {"Content-Type": "application/json"}
    if s.llm_api_key:
        headers["Authorization"] = f"Bearer {s.llm_api_key}"
    url = s.llm_url.rstrip("/") + "/chat/completions"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers),
                                    timeout=s.llm_timeout_s) as resp:
            data = json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise LLMError(f"the LLM endpoint {url} answered HTTP {exc.code}: "
                       f"{exc.read()[:300]!r}") from exc
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise LLMError(f"cannot reach the LLM endpoint {url}: {exc}; unset "
                       "MATCOUPLE_LLM_URL to use the deterministic planner") from exc
    except json.JSONDecodeError as exc:
        raise LLMError(f"the LLM endpoint {url} did not answer JSON: {exc}") from exc
    try:
        return data["choices"][0]["message"]
    except (KeyError, IndexError, TypeError) as exc:
        raise LLMError(f"the LLM endpoint {url} answered without choices[0].message: "
                       f"{str(data)[:300]}") from exc


class ToolRunner:
    """Runs the tools an LLM asks for, as the planner's steps on the run's database."""

    def __init__(self, config: dr.DesignConfig, lp: LaunchPad, console=None) -> None:
        self.lp = lp
        self.run = config.run
        self.console = console
        self.iteration = 0
        self.owner = "llm"
        dr.create_run(lp.db, config)

    def __call__(self, name: str) -> dict[str, Any]:
        from matcouple.coordinate import planner

        db = self.lp.db
        if name == "query_database":
            return planner.query_step(db, self.run)
        if name == "generate_structures":
            cfg = dr.run_config(db, self.run)
            if self.iteration >= cfg.max_iterations:
                return {"error": f"iteration cap {cfg.max_iterations} reached"}
            self.iteration += 1
            dr.runs(db).update_one({"_id": self.run},
                                   {"$set": {"last_iteration": self.iteration}})
            return planner.generate_step(db, self.run, self.iteration)
        if name == "predict_properties":
            out = planner.decide_step(db, self.run, self.iteration, self.owner)
            from matcouple.coordinate.tools import run_dft

            cfg = dr.run_config(db, self.run)
            run_dft(cfg.launchpad_file, out.to_dft, run=self.run, engine=cfg.engine,
                    preset=cfg.preset)
            return {**out.summary(), "progress": dr.progress(db, self.run)}
        if name == "run_dft":
            from matcouple.coordinate.cli import _launch

            cfg = dr.run_config(db, self.run)
            _launch(cfg.launchpad_file, db, self.run, 1)
            return dr.progress(db, self.run)
        raise LLMError(f"the LLM asked for an unknown tool {name!r}")


def plan_with_llm(config: dr.DesignConfig, lp: LaunchPad, console=None) -> None:
    """Let the configured LLM drive the tools until it calls ``finish`` (or the turn cap)."""
    runner = ToolRunner(config, lp, console)
    req = config.request
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": (
            "You design crystals. Use the tools: query the database first, then generate "
            "candidates, predict their properties (low-confidence ones are queued for DFT), "
            "run DFT when some are queued, and repeat until enough structures meet the "
            "target, then call finish.")},
        {"role": "user", "content": req.text or
         f"up to {req.n} structures of {req.formula} with {req.target.describe()}"}]
    for _ in range(get_settings().llm_max_turns):
        message = chat(messages, TOOLS)
        messages.append(message)
        calls = message.get("tool_calls") or []
        if not calls:
            return
        for call in calls:
            name = call.get("function", {}).get("name", "")
            if name == "finish":
                return
            if console:
                console.print(f"  LLM -> {name}")
            result = runner(name)
            messages.append({"role": "tool", "tool_call_id": call.get("id", name),
                             "content": json.dumps(result, default=str)[:4000]})
