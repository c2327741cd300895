"""BentoML's process manager listens on no TCP port but the server's own."""

import os
import stat
from pathlib import Path

from tests.conftest import Server


def socket_inodes(pid: int) -> set[str]:
    links = (os.readlink(fd) for fd in Path(f"/proc/{pid}/fd").iterdir())
    return {link[8:-1] for link in links if link.startswith("socket:[")}


def listening_tcp_ports(pid: int) -> set[int]:
    inodes, ports = socket_inodes(pid), set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def unix_socket_paths(pid: int) -> set[Path]:
    inodes, paths = socket_inodes(pid), set()
    for line in Path("/proc/net/unix").read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) == 8 and fields[6] in inodes:
            paths.add(Path(fields[7]))
    return paths


def test_the_arbiter_has_no_tcp_control_port_and_its_sockets_are_private(server: Server) -> None:
    assert listening_tcp_ports(server.pid) == {int(server.url.rsplit(":", 1)[1])}
    control = {path for path in unix_socket_paths(server.pid) if path.name in ("control", "events")}
    assert {path.name for path in control} == {"control", "events"}
    for path in control:
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert path.parent.stat().st_uid == os.getuid()
