"""Which versions of a model are served, as Triton's version policy says it: `all`, `latest:N`
(the N highest versions on disk) or `specific:1,3` (those, where they exist)."""
from __future__ import annotations

import re

POLICY = re.compile(r"^(all|latest:[1-9][0-9]{0,5}|specific:[1-9][0-9]{0,9}(,[1-9][0-9]{0,9})*)$")


def check_policy(policy: str) -> str:
    policy = policy.strip().replace(" ", "")
    if not POLICY.match(policy):
        raise ValueError(f"version policy {policy!r}: use all, latest:N or specific:V1,V2,…")
    return policy


def selected_versions(policy: str, versions: list[int]) -> set[int]:
    kind, _, argument = policy.partition(":")
    if kind == "latest":
        return set(sorted(versions)[-int(argument):])
    if kind == "specific":
        return set(versions) & {int(v) for v in argument.split(",")}
    return set(versions)


def triton_policy(policy: str) -> dict:
    """The policy as Triton's model configuration writes it (`{"latest": {"num_versions": 2}}`)."""
    kind, _, values = policy.partition(":")
    if kind == "latest":
        return {"latest": {"num_versions": int(values)}}
    if kind == "specific":
        return {"specific": {"versions": [int(v) for v in values.split(",")]}}
    return {"all": {}}
