"""The soak's hosts as network namespaces (tests/netns.py): filled in once that harness exists."""

from __future__ import annotations


class NetnsTopology:
    description = "network namespaces"
    network_faults = True

    def __init__(self, client_hosts: int, *, coordinators: int) -> None:
        raise NotImplementedError("tests/netns.py is not merged yet; use --local")

    def argv(self, host: str, cmd: list[str]) -> list[str]:
        raise NotImplementedError

    def address(self, host: str) -> str:
        raise NotImplementedError

    def link_down(self, host: str) -> None:
        raise NotImplementedError

    def link_up(self, host: str) -> None:
        raise NotImplementedError

    def cut(self, host: str) -> None:
        raise NotImplementedError

    def heal(self, host: str) -> None:
        raise NotImplementedError

    def netem(self, host: str, spec: str) -> None:
        raise NotImplementedError

    def netem_clear(self, host: str) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass
