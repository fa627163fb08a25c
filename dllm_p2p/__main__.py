"""``python -m dllm_p2p``: bare, it starts a worker; see ``--help`` for subcommands."""

from .cli import main

raise SystemExit(main())
