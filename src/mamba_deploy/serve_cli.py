"""The `mamba-deploy serve` verb: its flags, and the process around the server (serve.py) that
opens the runner, serves until a signal, and shuts down without breaking off its clean-up."""

from __future__ import annotations

import sys

from . import serve
from .errors import ConfigError
from .serve_http import bind_error, check_can_listen


def cmd_serve(args):
    import signal

    from .chat import read_template_file
    from .cli import runner_options, use_tokenizer
    from .runners import open_runner

    # read before the model loads; the "no chat template" 400 names this flag as the fix
    template = read_template_file(args.chat_template) if args.chat_template else None
    options = runner_options(args)  # flags the backend would not take, before anything else
    try:  # --max-batch / --max-tokens-limit / --max-prompt-tokens >= 1: argparse (positive_int)
        check_can_listen(args.host, args.port)
    except OSError as e:
        raise bind_error(args.host, args.port, e) from None
    runner = open_runner(args.model, args.backend, **options)
    try:
        use_tokenizer(runner, args.tokenizer)
        server = serve.make_server(runner, args.host, args.port, max_batch=args.max_batch,
                             model_name=args.model_name or serve.default_model_name(runner, args.model),
                             max_tokens_limit=args.max_tokens_limit, quiet=args.quiet, chat_template=template,
                             max_prompt_tokens=args.max_prompt_tokens, prefill_chunk=args.prefill_chunk,
                             max_num_seqs=args.max_num_seqs, request_timeout=args.request_timeout,
                             max_connections=args.max_connections, allowed_hosts=args.allowed_hosts)
    except ConfigError:  # the port was taken since check_can_listen
        runner.close()
        raise

    # SIGHUP (the terminal closed) too, unless it is ignored (nohup): cli.main turns it into an
    # interrupt, and a second one must not break off the clean-up either
    stops = [signal.SIGINT, signal.SIGTERM]
    if hasattr(signal, "SIGHUP") and signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        stops.append(signal.SIGHUP)

    def _again(signum, frame):  # a second Ctrl-C / SIGTERM / SIGHUP must not break off the clean-up below
        server.scheduler.stop()
        print(f"already shutting down (waiting at most {server.close_timeout:g} s for running requests)",
              file=sys.stderr, flush=True)

    def _stop(signum, frame):  # the first of them: later ones wait for the clean-up
        for sig in stops:
            signal.signal(sig, _again)
        # the model loop also ends by this flag: a KeyboardInterrupt raised while the main thread
        # runs a finalizer (a llama.cpp state's) is printed and dropped by Python, and the server
        # then ran on for good, every later signal only saying "already shutting down"
        server.scheduler.stop()
        raise KeyboardInterrupt

    defaults = {sig: signal.signal(sig, _stop) for sig in stops}
    print(f"serving {server.model_name} ({runner.name}) on {server.url}  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
    finally:
        for sig in stops:  # also when serve_forever ended by an error
            signal.signal(sig, _again)
        try:
            server.server_close()
            if server.unfinished:  # freeing the runner under a running request could crash it
                print(f"warning: {len(server.unfinished)} request(s) still running after "
                      f"{server.close_timeout:g} s; exiting without closing the model", file=sys.stderr)
            else:
                runner.close()
        finally:
            for sig, handler in defaults.items():  # what was there before (cli.main's, or a host app's)
                signal.signal(sig, handler)


def register(subparsers) -> None:
    from .argtypes import backend_choice, host_list, port, positive_float, positive_int
    from .cli import DEVICE_HELP, DTYPES, add_state_dtype, add_threads, add_tokenizer

    s = subparsers.add_parser("serve", help="OpenAI-style HTTP server (/v1/completions, /v1/chat/completions, /health)")
    s.add_argument("model", help="checkpoint folder, hub id, ONNX folder or .gguf file")
    s.add_argument("--backend", default=None, type=backend_choice,
                   help="torch | onnx | llama.cpp | openvino | ... (default: from the path)")
    add_tokenizer(s)
    s.add_argument("--host", default="127.0.0.1",
                   help="IPv4 address or host name to listen on: 127.0.0.1 = this machine only, 0.0.0.0 = every "
                        "interface")
    s.add_argument("--port", type=port, default=8000, help="0 picks a free port")
    s.add_argument("--max-batch", type=positive_int, default=8,
                   help="most prompts in one request")
    s.add_argument("--max-num-seqs", type=positive_int, default=16, metavar="N",
                   help="most sequences (prompts of all running requests) decoded together in one batch; "
                        "requests join and leave it as they start and finish; 1 = one request at a time "
                        "(default 16)")
    s.add_argument("--max-tokens-limit", type=positive_int, default=4096,
                   help="largest max_tokens a request may ask for")
    s.add_argument("--max-prompt-tokens", type=positive_int, default=None, metavar="N",
                   help="longest prompt a request may send, in tokens (any prompt of a batch, or the rendered "
                        "chat); longer ones get a 400 (default: no limit)")
    s.add_argument("--prefill-chunk", type=positive_int, default=1024, metavar="N",
                   help="feed prompts N tokens at a time; between pieces the running requests decode a token, "
                        "a request whose client disconnected stops, and memory stays bounded (default 1024)")
    s.add_argument("--request-timeout", type=positive_float, default=60.0, metavar="SECONDS",
                   help="time a request may take to arrive (its line, headers and body; slower clients get a 408 "
                        "or are disconnected), and the longest a keep-alive connection idles (default 60)")
    s.add_argument("--max-connections", type=positive_int, default=256, metavar="N",
                   help="open connections at most (each has a thread); more get a 503 at once (default 256)")
    s.add_argument("--allowed-hosts", type=host_list, default=None, metavar="NAME,...",
                   help="names clients may reach this server by (the Host header; a browser page's Origin must "
                        "be one too); default: localhost, 127.0.0.1, ::1 when --host is a loopback address "
                        "(a web page cannot use the server through DNS rebinding), else any; * = any")
    s.add_argument("--model-name", default=None,
                   help="name reported as `model` (default: the folder name, or a .gguf file's name)")
    s.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions instead of the model's own")
    s.add_argument("--device", default="cpu", help=DEVICE_HELP)
    s.add_argument("--dtype", default="fp32", type=str.lower, choices=sorted(DTYPES), help="dtype for the torch backend")
    add_state_dtype(s)
    add_threads(s)
    s.add_argument("--quiet", action="store_true", help="no per-request log lines")
    s.set_defaults(func=cmd_serve)
