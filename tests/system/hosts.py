"""The soak's hosts as network namespaces (tests/netns.py): a Redis host, two coordinator hosts
and the client hosts, all on one bridge that the test process reaches too."""

from __future__ import annotations

from tests.netns import Host, Network


class NetnsTopology:
    """tests/netns.py's Network, seen as the soak's Topology."""

    network_faults = True

    def __init__(self, client_hosts: int, *, coordinators: int) -> None:
        self.network = Network().__enter__()
        try:
            names = ["redis", *(f"coord{i}" for i in range(coordinators))]
            names += [f"host{i}" for i in range(client_hosts)]
            self.hosts: dict[str, Host] = {name: self.network.add_host(name) for name in names}
        except BaseException:
            self.network.close()
            raise
        self.description = (
            f"network namespaces on a bridge (netem via {self._netem_backend_hint()})"
        )

    @staticmethod
    def _netem_backend_hint() -> str:
        return "tc, or NFQUEUE where the kernel lacks sch_netem"

    def argv(self, host: str, cmd: list[str]) -> list[str]:
        return self.hosts[host].argv(cmd)

    def wrap(self, host: str) -> tuple[str, ...]:
        return self.hosts[host].wrap

    def address(self, host: str) -> str:
        return self.hosts[host].ip

    def link_down(self, host: str) -> None:
        self.hosts[host].link_down()

    def link_up(self, host: str) -> None:
        self.hosts[host].link_up()

    def cut(self, host: str) -> None:
        self.hosts[host].cut()

    def heal(self, host: str) -> None:
        self.hosts[host].heal()

    def netem(self, host: str, delay_ms: float, jitter_ms: float, loss_pct: float) -> str:
        return self.hosts[host].netem(delay_ms, jitter_ms, loss_pct)

    def netem_clear(self, host: str) -> None:
        self.hosts[host].clear_netem()

    def close(self) -> None:
        self.network.close()
