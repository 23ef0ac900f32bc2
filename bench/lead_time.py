"""Benchmark 5: lead time from a recipe to a live endpoint, and from a promotion to the new version serving.

Part 1, recipe → live endpoint: the quickstart's stages as ``forgeline quickstart`` runs
them (the same `forgeline.pipeline` functions: validate, train + track + register,
evaluate, promote, build), then ``forgeline serve`` started as its own process, until the
first answer arrives through the ``openai`` SDK. The figure next to the total is the
share spent training, the part a plain training script would spend too.

Part 2, promotion → new version serving: a second version (the first one's adapter
registered again, with its evaluation, and built beforehand, off the clock) is promoted through the
recipe's policy while a client asks the running gateway every 50 ms which version
answers (``x-forgeline-model-version``). The clock runs from the promote call to the first
answer from the new version. Two ways, alternating:

* hot swap: the gateway follows the alias itself (it watches the audit log for alias moves
  every ``serve.watch_interval_s`` and re-reads aliases every ``serve.poll_interval_s``), loads the new
  version beside the old one and switches; no request fails;
* restart (the baseline without hot swap): promote, stop the gateway, start it again.
"""

from __future__ import annotations

import getpass
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from bench import harness
from bench.procs import REPO, ServerProcess, free_port
from bench.stats import spread

logger = logging.getLogger(__name__)

NAME = "lead_time"
QUICKSTART = REPO / "recipes" / "quickstart.yaml"
PROBE_INTERVAL_S = 0.05

SETTINGS: dict[str, dict[str, Any]] = {
    # A shortened quickstart: a few steps, a handful of eval rows, gates that always pass.
    "smoke": {"shorten": True, "poll_interval_s": 0.5, "swaps": 1, "restarts": 0, "swap_timeout_s": 60.0},
    # The quickstart as shipped, with the gateway's default alias poll interval.
    "full": {"shorten": False, "poll_interval_s": None, "swaps": 2, "restarts": 1, "swap_timeout_s": 90.0},
}


def write_recipe(work: Path, *, shorten: bool, poll_interval_s: float | None) -> Path:
    """The quickstart recipe with absolute paths (optionally shortened) in ``work``."""
    raw = yaml.safe_load(QUICKSTART.read_text())
    here = QUICKSTART.parent
    raw["model"]["base"] = str((here / raw["model"]["base"]).resolve())
    for key in ("train", "eval"):
        raw["data"][key] = str((here / raw["data"][key]).resolve())
    if shorten:
        raw["train"].update(max_steps=1, logging_steps=1, save_steps=100)
        raw["evaluate"] = {"max_samples": 4, "max_new_tokens": 4}
        raw["promote"] = {"to": "production"}  # one step learns nothing: no metric gates
    if poll_interval_s is not None:
        raw.setdefault("serve", {})["poll_interval_s"] = poll_interval_s
    path = work / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


class Probe:
    """Asks the gateway which version answers, as a client would."""

    def __init__(self, base_url: str, model: str) -> None:
        self.url = f"{base_url}/v1/chat/completions"
        self.body = {"model": model, "messages": [{"role": "user", "content": "Route this ticket: hi"}], "max_tokens": 1}
        self.client = httpx.Client(timeout=10.0)
        self.failed = 0
        self.answered = 0

    def version(self) -> str | None:
        """The version that answered (``name/version``), or None when the request failed."""
        try:
            response = self.client.post(self.url, json=self.body)
        except httpx.HTTPError:
            self.failed += 1
            return None
        if response.status_code != 200:
            self.failed += 1
            return None
        self.answered += 1
        return response.headers.get("x-forgeline-model-version")

    def wait_for(self, version: str, timeout_s: float) -> float:
        """Seconds until ``version`` answers (probing every 50 ms)."""
        began = time.perf_counter()
        while time.perf_counter() - began < timeout_s:
            if self.version() == version:
                return time.perf_counter() - began
            time.sleep(PROBE_INTERVAL_S)
        raise TimeoutError(f"version {version} did not answer within {timeout_s:.0f} s")

    def close(self) -> None:
        self.client.close()


def start_gateway(recipe: Path, model: str, work: Path, tag: str) -> ServerProcess:
    """``forgeline serve`` for ``model`` with the recipe's serve options (keys off: the probe has none)."""
    port = free_port()
    argv = [str(Path(_forgeline_exe())), "serve", "--model", model, "--recipe", str(recipe), "--port", str(port), "--device", "cpu", "--no-auth"]
    return ServerProcess(f"forgeline-serve-{tag}", argv, port=port, log_path=work / "logs" / f"serve-{tag}.log")


def _forgeline_exe() -> str:
    import shutil
    import sys

    local = Path(sys.executable).parent / "forgeline"
    return str(local) if local.is_file() else (shutil.which("forgeline") or "forgeline")


def first_answer(server: ServerProcess, model: str, timeout_s: float = 240.0) -> float:
    """Seconds until the gateway gives a first answer through the ``openai`` SDK."""
    from openai import OpenAI

    began = time.perf_counter()
    server.wait_healthy("/ready", timeout_s=timeout_s)
    client = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Route this ticket: hi"}], max_tokens=4)
    return time.perf_counter() - began


def recipe_to_endpoint(recipe_path: Path, work: Path) -> tuple[dict[str, Any], ServerProcess, Any]:
    """Part 1; returns its timings, the running gateway and the trained version."""
    from forgeline import pipeline
    from forgeline.recipe import load_recipe
    from registry.client import Registry

    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    mark = t0

    def lap(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        stages[name] = now - mark
        mark = now
        logger.info("stage %s: %.1f s", name, stages[name])

    registry = Registry()
    lap("open registry")
    recipe = load_recipe(recipe_path)
    lap("validate")
    result = pipeline.train(recipe, recipe_path, registry=registry)
    lap("train")
    version = result.version
    pipeline.evaluate(registry, version.name, version.version, spec=recipe.evaluate)
    lap("evaluate")
    pipeline.promote_version(
        registry, version.name, version.version, recipe.promote, alias=recipe.promote.to, actor=getpass.getuser(), reason="bench: lead time"
    )
    lap("promote")
    pipeline.build(registry, f"{version.name}@{recipe.promote.to}")
    lap("build")
    server = start_gateway(recipe_path, version.name, work, "1")
    try:
        first_answer(server, version.name)
    except BaseException:
        server.stop()
        raise
    lap("serve")
    total = time.perf_counter() - t0
    return {"stages_s": stages, "total_s": total, "train_share": stages["train"] / total}, server, (registry, recipe, version)


def second_version(registry: Any, v1: Any) -> Any:
    """The same adapter registered as a new version, with its evaluation and a build (off the clock).

    The adapter is v1's, so v1's recorded evaluation is its evaluation too: it is copied
    rather than recomputed, which saves the suite a minute.
    """
    from forgeline import pipeline
    from registry import lineage

    v1 = registry.get_version(v1.name, v1.version)  # with the evaluation recorded after training
    tags = {k: v for k, v in v1.tags.items() if not k.startswith((lineage.ENGINE_PREFIX, lineage.EVAL_PREFIX, lineage.BASE_EVAL_PREFIX))}
    v2 = registry.create_version(v1.name, source=v1.source, run_id=v1.run_id, tags=tags, description="bench: lead time (same adapter)")
    registry.record_evaluation(v2.name, v2.version, v1.metrics(), base_metrics=v1.base_metrics() or None)
    pipeline.build(registry, f"{v2.name}@{v2.version}")
    return v2


def promote(registry: Any, recipe: Any, name: str, version: int) -> float:
    """Promote through the recipe's policy; seconds the call took."""
    from forgeline import pipeline

    began = time.perf_counter()
    pipeline.promote_version(registry, name, version, recipe.promote, alias=recipe.promote.to, actor=getpass.getuser(), reason="bench: lead time")
    return time.perf_counter() - began


def run(setting: str, work: Path) -> dict[str, Any]:
    cfg = SETTINGS[setting]
    recipe_path = write_recipe(work, shorten=cfg["shorten"], poll_interval_s=cfg["poll_interval_s"])
    part1, server, (registry, recipe, v1) = recipe_to_endpoint(recipe_path, work)
    name = v1.name
    swaps: list[dict[str, Any]] = []
    restarts: list[dict[str, Any]] = []
    try:
        v2 = second_version(registry, v1)
        versions = [v1.version, v2.version]
        current = 0  # index in `versions` of the production holder
        probe = Probe(server.base_url, name)
        try:
            for i in range(cfg["swaps"]):
                target = versions[1 - current]
                probe.failed = probe.answered = 0
                began = time.perf_counter()
                promote_s = promote(registry, recipe, name, target)
                probe.wait_for(f"{name}/{target}", cfg["swap_timeout_s"] - promote_s)
                swaps.append({"lead_s": time.perf_counter() - began, "promote_s": promote_s, "failed_requests": probe.failed, "answered": probe.answered})
                logger.info("hot swap %d to v%d: %.1f s (%d failed requests)", i, target, swaps[-1]["lead_s"], probe.failed)
                current = 1 - current
        finally:
            probe.close()
        for i in range(cfg["restarts"]):
            target = versions[1 - current]
            began = time.perf_counter()
            promote_s = promote(registry, recipe, name, target)
            server.stop()
            server = start_gateway(recipe_path, name, work, f"restart-{i}")
            first_answer(server, name)
            probe = Probe(server.base_url, name)
            try:
                answered_by = probe.version()
            finally:
                probe.close()
            if answered_by != f"{name}/{target}":
                raise RuntimeError(f"after a restart the gateway answered as {answered_by}, expected {name}/{target}")
            restarts.append({"lead_s": time.perf_counter() - began, "promote_s": promote_s})
            logger.info("restart %d to v%d: %.1f s", i, target, restarts[-1]["lead_s"])
            current = 1 - current
    finally:
        server.stop()
    swap = spread([s["lead_s"] for s in swaps])
    restart = spread([r["lead_s"] for r in restarts])
    return {
        "recipe": "recipes/quickstart.yaml" + (" (shortened: 1 step, 4 eval rows, no gates)" if cfg["shorten"] else ""),
        "settings": cfg,
        "poll_interval_s": recipe.serve.poll_interval_s,
        "watch_interval_s": recipe.serve.watch_interval_s,
        "recipe_to_endpoint": part1,
        "promotion_to_serving": {
            "hot_swap": swaps,
            "restart": restarts,
            "summary": {
                "hot_swap_s": swap,
                "restart_s": restart,
                "hot_swap_over_restart": (swap["median"] / restart["median"]) if swap["median"] and restart["median"] else None,
                "failed_requests_during_hot_swaps": sum(s["failed_requests"] for s in swaps),
            },
        },
    }


if __name__ == "__main__":
    raise SystemExit(harness.main(NAME, run))
