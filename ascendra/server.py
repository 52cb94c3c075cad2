"""``python -m ascendra.server``: start the coordinator and its workers, then serve HTTP.

Startup: resolve the model once (building the local cache if needed), load the tokenizer,
spawn one worker per instance and wait for each to register, then listen. SIGINT/SIGTERM:
stop admitting, let in-flight requests finish for up to --drain-timeout seconds, end the
rest, shut the workers down (killing stragglers), and exit.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys

from ascendra.config import add_flags, from_args

log = logging.getLogger("ascendra.server")


class _HelpFormatter(argparse.HelpFormatter):
    """Appends "(default: X)" unless the help already explains the default or there is none."""

    def _get_help_string(self, action: argparse.Action) -> str:
        h = action.help or ""
        if "default" in h or action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return h
        return h + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ascendra.server",
        description="Ascendra: OpenAI-compatible LLM server with SLO-aware multi-instance scheduling.",
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port; 0 picks a free one")
    p.add_argument("--model", default=None,
                   help="local Hugging Face model directory, 'tiny' (random-weight test model), "
                        "or leave out for the embedded SmolLM2-135M-Instruct")
    p.add_argument("--served-model-name", default=None,
                   help="name reported by /v1/models and in responses (default: the model's name)")
    # The serving settings: names, defaults, bounds and help from ascendra.config.ServingConfig.
    add_flags(p, ["device", "dtype", "num_instances", "worker_threads", "policy", "num_hp"])
    p.add_argument("--paper-escalation", action="store_true",
                   help="ascendra: escalate only requests that have not started (the paper's code) "
                        "instead of at every stage with KV migration")
    p.add_argument("--no-class-routing", action="store_true",
                   help="ascendra: route every request as one class (an ablation of routing by TBT objective)")
    add_flags(p, ["force_escalation_after", "ttft_slo", "tbt_slo", "max_waiting", "admission", "chunk_size",
                  "max_num_seqs", "max_seats", "max_chunk", "num_blocks", "block_size", "gpu_memory_utilization", "max_model_len",
                  "fake_model", "fake_step_time", "seed"])
    p.add_argument("--drain-timeout", type=float, default=5.0,
                   help="on SIGINT/SIGTERM, seconds to let in-flight requests finish before ending them")
    add_flags(p, ["startup_timeout", "step_log"])
    p.add_argument("--max-request-bytes", type=int, default=0,
                   help="largest request body in bytes, 413 beyond (default 0: 64 KiB + 32 x max_model_len)")
    p.add_argument("--max-prompt-chars", type=int, default=0,
                   help="most characters of prompt or chat messages, checked before tokenising "
                        "(default 0: 16 x max_model_len)")
    p.add_argument("--request-header-timeout", type=float, default=30.0,
                   help="seconds a connection may take to send a request's headers, or sit idle between "
                        "requests, before it is closed")
    p.add_argument("--request-body-timeout", type=float, default=60.0,
                   help="seconds to receive a request body once its headers are in (408 beyond)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/* (401 otherwise); /health and /metrics "
                        "stay open. Default: the ASCENDRA_API_KEY environment variable, if set")
    p.add_argument("--allow-request-chat-template", action="store_true",
                   help="let requests supply their own Jinja chat template (chat_template, "
                        "chat_template_kwargs.chat_template); off by default, as a template can run unbounded")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="logging verbosity")
    return p


def _set_num_threads() -> None:
    # The coordinator's tokenizer should not fight the workers for the few CPU cores.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load_tokenizer(path: str):
    """The model's tokenizer, without importing torch when a tokenizer.json is there.

    (AutoTokenizer's import pulls in torch: seconds of startup and memory the coordinator
    does not need.)
    """
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


async def serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from ascendra.api import API, APILimits
    from ascendra.coordinator import Coordinator, StartupError, expand_devices
    from ascendra.defaults import policy_note
    from ascendra.models import ModelNotFound, resolve_model

    try:
        resolved = resolve_model(args.model)
    except ModelNotFound as e:
        log.error("%s", e)
        return 2
    tokenizer = load_tokenizer(resolved.path)
    try:
        policy, why = policy_note(args.policy, len(expand_devices(args.device, args.num_instances)))
    except StartupError as e:
        log.error("%s", e)
        return 2
    log.info("policy %s (%s)", policy, why)
    config = from_args(args, model_path=resolved.path, model_name=args.served_model_name or resolved.name,
                       escalate_started=not args.paper_escalation,
                       class_routing=not args.no_class_routing, policy=policy)
    try:
        coord = Coordinator(config, tokenizer)
    except (StartupError, ValueError) as e:
        log.error("%s", e)
        return 2

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    runner: web.AppRunner | None = None
    code = 0
    try:
        start = asyncio.create_task(coord.start())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait([start, stopper], return_when=asyncio.FIRST_COMPLETED)
        if not start.done():
            log.info("interrupted during startup")
            start.cancel()
            await asyncio.gather(start, return_exceptions=True)
            return 130
        stopper.cancel()
        start.result()  # raises StartupError

        names = [config.model_name, resolved.name, resolved.path]
        if args.model:
            names.append(args.model)
        limits = APILimits(
            max_request_bytes=args.max_request_bytes,
            max_prompt_chars=args.max_prompt_chars,
            body_timeout=args.request_body_timeout,
            api_key=args.api_key or os.environ.get("ASCENDRA_API_KEY") or None,
            allow_request_chat_template=args.allow_request_chat_template,
        )
        api = API(coord, list(dict.fromkeys(names)), limits)
        # keepalive_timeout also bounds how long a new connection may take to send its first
        # request's headers (aiohttp arms it at connection_made): no slowloris holds a socket.
        runner = web.AppRunner(api.app(), handler_cancellation=True, access_log=None, shutdown_timeout=2.0,
                               keepalive_timeout=args.request_header_timeout)
        await runner.setup()
        site = web.TCPSite(runner, args.host, args.port, backlog=1024, reuse_address=True)
        await site.start()
        port = runner.addresses[0][1] if runner.addresses else args.port
        # Tests and scripts wait for this exact line.
        print(f"Ascendra serving {config.model_name} on http://{args.host}:{port} "
              f"({len(coord.workers)} instance(s), policy {config.policy})", flush=True)
        await stop.wait()
        log.info("shutting down: draining in-flight requests (up to %.1fs)", args.drain_timeout)
        await coord.drain(args.drain_timeout)
        await asyncio.sleep(0.05)  # let handlers write the final events
    except StartupError as e:
        log.error("startup failed: %s", e)
        code = 1
    finally:
        if runner is not None:
            await runner.cleanup()
            log.debug("HTTP server closed")
        await coord.shutdown()
        log.info("shut down")
    return code


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from_args(args, parser)  # a setting out of bounds ends here, naming its flag (exit 2)
    _set_num_threads()
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        import uvloop

        return uvloop.run(serve(args))
    except ImportError:
        return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
