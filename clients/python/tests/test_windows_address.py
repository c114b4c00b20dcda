r"""Address resolution on every platform, and whom a Windows client trusts
to serve a pipe: pure functions, run here on Linux by passing the platform
(``"nt"``) and the environment in. No daemon, no Windows.

The trust cases are those of ``proto/src/address.rs`` (``pipe_trust_tests``),
so the Rust and Python clients cannot disagree on them.
"""

from __future__ import annotations

import os
import unittest
from typing import Tuple
from unittest import mock

from lockbroker import PROCESS, ConnectFailed, Untrusted
from lockbroker.address import (
    ADMINISTRATORS_SID,
    GLOBAL,
    LOCAL,
    POSIX,
    SYSTEM_SID,
    WINDOWS,
    Address,
    PipeIdentity,
    check_pipe_server,
    default_address,
    default_path,
    expected_pipe_server,
    resolve,
    windows_uid,
)
from lockbroker.client import Client

ME = "S-1-5-21-1-2-3-1001"
OTHER = "S-1-5-21-1-2-3-1002"


def identity(sid: str, owner: str) -> PipeIdentity:
    return PipeIdentity(sid, owner, "HOST\\someone")


class WindowsResolveTest(unittest.TestCase):
    """explicit > LOCKBROKER_SOCKET > scope default, with pipe names."""

    def test_scope_defaults_are_pipes(self) -> None:
        env = {"USERNAME": "alice", "XDG_RUNTIME_DIR": "/run/user/7"}
        self.assertEqual(
            resolve(None, LOCAL, env, WINDOWS), Address(r"\\.\pipe\lockbroker-alice", "scope", LOCAL)
        )
        self.assertEqual(resolve(None, GLOBAL, env, WINDOWS), Address(r"\\.\pipe\lockbroker", "scope", GLOBAL))
        self.assertEqual(default_path(GLOBAL, {}, WINDOWS), r"\\.\pipe\lockbroker")

    def test_the_user_name_is_username_else_default(self) -> None:
        self.assertEqual(default_address(LOCAL, {}, WINDOWS), r"\\.\pipe\lockbroker-default")
        # Set but empty is used as it is, as the Rust client does.
        self.assertEqual(default_address(LOCAL, {"USERNAME": ""}, WINDOWS), "\\\\.\\pipe\\lockbroker-")
        # Never the POSIX variables.
        self.assertEqual(
            default_address(LOCAL, {"XDG_RUNTIME_DIR": "/run/user/7", "USER": "bob"}, WINDOWS),
            r"\\.\pipe\lockbroker-default",
        )

    def test_env_overrides_every_scope(self) -> None:
        env = {"LOCKBROKER_SOCKET": r"\\.\pipe\mine", "USERNAME": "alice"}
        for scope in (LOCAL, GLOBAL, PROCESS):
            self.assertEqual(resolve(None, scope, env, WINDOWS), Address(r"\\.\pipe\mine", "env", scope))

    def test_empty_env_is_unset(self) -> None:
        env = {"LOCKBROKER_SOCKET": "", "USERNAME": "alice"}
        self.assertEqual(resolve(None, LOCAL, env, WINDOWS).path, r"\\.\pipe\lockbroker-alice")

    def test_explicit_wins(self) -> None:
        env = {"LOCKBROKER_SOCKET": r"\\.\pipe\env", "USERNAME": "alice"}
        for scope in (LOCAL, GLOBAL, PROCESS):
            self.assertEqual(
                resolve(r"\\.\pipe\x", scope, env, WINDOWS), Address(r"\\.\pipe\x", "explicit", scope)
            )

    def test_the_self_scope_has_no_default(self) -> None:
        for platform in (WINDOWS, POSIX):
            self.assertIsNone(default_address(PROCESS, {"USERNAME": "alice"}, platform))
            with self.assertRaises(ValueError):
                default_path(PROCESS, {}, platform)
            with self.assertRaises(ConnectFailed) as cm:
                resolve(None, PROCESS, {"USERNAME": "alice"}, platform)
            self.assertIn("the self scope needs LOCKBROKER_SOCKET", str(cm.exception))

    def test_unknown_scopes_are_refused(self) -> None:
        for platform in (WINDOWS, POSIX):
            with self.assertRaises(ValueError):
                resolve(None, "galaxy", {}, platform)
            with self.assertRaises(ValueError):
                resolve("/x.sock", "galaxy", {}, platform)

    def test_posix_is_unchanged(self) -> None:
        env = {"USERNAME": "alice", "XDG_RUNTIME_DIR": "/run/user/7"}
        self.assertEqual(resolve(None, LOCAL, env, POSIX).path, "/run/user/7/lockbroker/broker.sock")
        self.assertEqual(resolve(None, GLOBAL, env, POSIX).path, "/run/lockbroker/broker.sock")
        self.assertEqual(resolve(None, LOCAL, {}, POSIX).path, "/tmp/lockbroker-%d/broker.sock" % os.getuid())

    def test_a_client_of_the_self_scope_needs_lockbroker_socket(self) -> None:
        env = {k: v for k, v in os.environ.items() if k != "LOCKBROKER_SOCKET"}
        with mock.patch.dict(os.environ, env, clear=True):
            with self.assertRaises(ConnectFailed) as cm:
                Client(scope=PROCESS)
        self.assertIn("LOCKBROKER_SOCKET", str(cm.exception))


class PipeTrustTest(unittest.TestCase):
    """``pipe_trust_tests`` of proto/src/address.rs, case for case."""

    def expected(self, source: str, scope: str = LOCAL, allowed: Tuple[str, ...] = ()) -> Tuple[str, ...]:
        return expected_pipe_server(Address(r"\\.\pipe\x", source, scope), ME, allowed)

    def test_uids_are_numbered_as_cygwin_numbers_accounts(self) -> None:
        self.assertEqual(windows_uid(SYSTEM_SID, False), 18)
        self.assertEqual(windows_uid(ADMINISTRATORS_SID, False), 0x20220)
        self.assertEqual(windows_uid(ME, True), 0x30000 + 1001)
        self.assertEqual(windows_uid(ME, False), 0x100000 + 1001)
        self.assertIsNone(windows_uid("S-1-1-0", False))
        self.assertIsNone(windows_uid("S-1-5-x", False))
        self.assertIsNone(windows_uid("garbage", True))
        # Beyond the Rust cases: what u32 parsing refuses, and overflow.
        self.assertIsNone(windows_uid("S-1-5-", False))
        self.assertIsNone(windows_uid("S-1-5-4294967296", False))
        self.assertIsNone(windows_uid("S-1-5-21-1-4294967295", False))

    def test_the_local_pipe_must_be_served_by_the_user(self) -> None:
        want = self.expected("scope", LOCAL)
        self.assertEqual(want, (ME,))
        pipe = r"\\.\pipe\lockbroker-me"
        check_pipe_server(pipe, identity(ME, ME), want)
        with self.assertRaises(Untrusted) as cm:
            check_pipe_server(pipe, identity(OTHER, OTHER), want)
        e = cm.exception
        self.assertEqual((e.problem, e.owner, e.expected, e.path), ("server", OTHER, (ME,), pipe))
        self.assertIn(OTHER, str(e))
        self.assertIn(ME, str(e))
        self.assertEqual(
            str(e), r"the daemon at \\.\pipe\lockbroker-me runs as HOST\someone (%s), expected %s" % (OTHER, ME)
        )
        self.assertIsInstance(e, ConnectFailed)
        # Even an elevated process of another user: not the user.
        with self.assertRaises(Untrusted):
            check_pipe_server(pipe, identity(OTHER, ADMINISTRATORS_SID), want)
        with self.assertRaises(Untrusted):
            check_pipe_server(pipe, identity(SYSTEM_SID, SYSTEM_SID), want)

    def test_the_global_pipe_must_be_served_by_system_or_an_elevated_process(self) -> None:
        want = self.expected("scope", GLOBAL)
        self.assertEqual(want, (SYSTEM_SID, ADMINISTRATORS_SID))
        pipe = r"\\.\pipe\lockbroker"
        check_pipe_server(pipe, identity(SYSTEM_SID, SYSTEM_SID), want)
        check_pipe_server(pipe, identity(OTHER, ADMINISTRATORS_SID), want)
        with self.assertRaises(Untrusted):
            check_pipe_server(pipe, identity(OTHER, OTHER), want)
        with self.assertRaises(Untrusted):
            check_pipe_server(pipe, identity(ME, ME), want)

    def test_an_explicit_pipe_takes_the_user_or_an_administrator_or_whom_the_caller_allows(self) -> None:
        for source in ("explicit", "env"):
            want = self.expected(source)
            self.assertEqual(want, (ME, SYSTEM_SID, ADMINISTRATORS_SID))
            pipe = r"\\.\pipe\mine"
            check_pipe_server(pipe, identity(ME, ME), want)
            check_pipe_server(pipe, identity(SYSTEM_SID, SYSTEM_SID), want)
            with self.assertRaises(Untrusted):
                check_pipe_server(pipe, identity(OTHER, OTHER), want)
            # allow_sids: compared ignoring case, in front of the defaults.
            want = self.expected(source, allowed=(OTHER.lower(),))
            self.assertEqual(want[0], OTHER.lower())
            check_pipe_server(pipe, identity(OTHER, OTHER), want)

    def test_allowed_sids_relax_a_scope_default_too(self) -> None:
        # As allow_uids on Unix: an opt-in applies on every address.
        want = self.expected("scope", LOCAL, allowed=(OTHER,))
        self.assertEqual(want, (OTHER, ME))
        check_pipe_server(r"\\.\pipe\lockbroker-me", identity(OTHER, OTHER), want)


if __name__ == "__main__":
    unittest.main()
