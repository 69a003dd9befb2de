#!/usr/bin/env python3
"""Write ``.env`` for the production stack with every secret generated at random.

    python docker/gen_env.py              # .env next to docker-compose.yml; refuses to overwrite
    python docker/gen_env.py --force      # regenerate (the databases keep their old passwords!)
    python docker/gen_env.py --output PATH

Reads ``.env.example``, fills every empty variable with a fresh secret from :mod:`secrets` (the Airflow
Fernet key in its own format), keeps the other values, and writes the file with mode 0600. Nothing has a
default password: the stack never starts with a well-known credential. Standard library only, so it
runs before anything is installed.
"""
from __future__ import annotations

import argparse
import base64
import os
import re
import secrets
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(?P<key>[A-Z][A-Z0-9_]*)=(?P<value>.*)$")


def new_secret(key: str) -> str:
    """A random value for ``key``: url-safe (no quoting needed in URLs, YAML or shell)."""
    if key == "AIRFLOW_FERNET_KEY":
        return base64.urlsafe_b64encode(os.urandom(32)).decode("ascii")
    # token_urlsafe(24) = 32 characters from [A-Za-z0-9_-]; a letter first keeps every parser happy
    return secrets.choice("abcdefghijkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ") + secrets.token_urlsafe(24)


def render(example: str) -> tuple[str, list[str]]:
    """``.env`` text from ``.env.example`` text, and the names of the generated variables."""
    out, generated = [], []
    for line in example.splitlines():
        m = LINE.match(line)
        if m and m.group("value") == "":
            out.append(f"{m.group('key')}={new_secret(m.group('key'))}")
            generated.append(m.group("key"))
        else:
            out.append(line)
    return "\n".join(out) + "\n", generated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--example", type=Path, default=ROOT / ".env.example")
    parser.add_argument("--output", type=Path, default=ROOT / ".env")
    parser.add_argument("--force", action="store_true", help="overwrite an existing file")
    args = parser.parse_args(argv)
    if args.output.exists() and not args.force:
        print(f"{args.output} exists; keep it (the databases were initialised with it) or pass --force",
              file=sys.stderr)
        return 1
    text, generated = render(args.example.read_text(encoding="utf-8"))
    tmp = args.output.with_name(f".{args.output.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, args.output)
    print(f"wrote {args.output} (mode 0600) with generated {', '.join(generated)}")
    print("the Airflow login is AIRFLOW_ADMIN_USER / AIRFLOW_ADMIN_PASSWORD from that file")
    return 0


if __name__ == "__main__":
    sys.exit(main())
