"""``dicom-triage web`` (serve the worklist) and ``dicom-triage users`` (add, list, disable, unlock users).

Hook into the main command with ``worker.web.cli.register(subparsers)``; ``serve`` starts the same server in a
thread with :func:`start_in_thread`.
"""

from __future__ import annotations

import argparse
import getpass
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from config import Settings
from worker.cli_options import add_settings_options, read_settings


def register(subparsers: Any) -> None:
    web = subparsers.add_parser("web", help="serve the radiologists' web worklist")
    add_settings_options(web)
    web.add_argument("--web-host", help="address to listen on (default from settings: 127.0.0.1)")
    web.add_argument("--web-port", type=int, help="port to listen on (default from settings: 8080)")
    add_web_tls_options(web)
    web.set_defaults(handler=_web)

    users = subparsers.add_parser("users", help="manage web users")
    actions = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a user; the password is prompted for, or read from stdin")
    add_settings_options(add)
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=["radiologist", "admin"])
    add.add_argument("--password-stdin", action="store_true", help="read the password from the first stdin line")
    add.set_defaults(handler=_users_add)
    listing = actions.add_parser("list", help="list users")
    add_settings_options(listing)
    listing.set_defaults(handler=_users_list)
    disable = actions.add_parser("disable", help="disable a user (ends their sessions)")
    add_settings_options(disable)
    disable.add_argument("name")
    disable.set_defaults(handler=_users_disable)
    unlock = actions.add_parser("unlock", help="lift a login lockout or back-off of a user name now")
    add_settings_options(unlock)
    unlock.add_argument("name")
    unlock.set_defaults(handler=_users_unlock)

    tokens = subparsers.add_parser("tokens", help="API tokens of sending systems (STOW-RS)")
    token_actions = tokens.add_subparsers(dest="tokens_command", required=True, metavar="ACTION")
    token_add = token_actions.add_parser("add", help="make a token for a sending system; it is printed once")
    add_settings_options(token_add)
    token_add.add_argument("name", help="the sending system, e.g. the PACS's name")
    token_add.set_defaults(handler=_tokens_add)
    bind = token_actions.add_parser(
        "add-certificate", help="let a client certificate with this subject authenticate as a sending system")
    add_settings_options(bind)
    bind.add_argument("name", help="the sending system, e.g. the PACS's name")
    bind.add_argument("--subject", required=True,
                      help="the certificate's subject as the web app's 403 names it, e.g. 'O=Hospital,CN=pacs'")
    bind.set_defaults(handler=_tokens_add_certificate)
    unbind = token_actions.add_parser("remove-certificate", help="remove the binding of a certificate subject")
    add_settings_options(unbind)
    unbind.add_argument("--subject", required=True)
    unbind.set_defaults(handler=_tokens_remove_certificate)


def add_web_tls_options(parser: argparse.ArgumentParser) -> None:
    """``--web-tls-cert/--web-tls-key``: HTTPS (Secure cookies, HSTS); without them put a TLS proxy in front.
    ``--web-tls-client-ca``: DICOMweb clients may authenticate by a certificate from that CA."""
    parser.add_argument("--web-tls-cert", type=Path, metavar="FILE",
                        help="serve the web app over HTTPS with this certificate (PEM; web_tls_cert)")
    parser.add_argument("--web-tls-key", type=Path, metavar="FILE", help="its private key (PEM; web_tls_key)")
    parser.add_argument("--web-tls-client-ca", type=Path, metavar="FILE",
                        help="ask HTTPS clients for a certificate from this CA bundle (optional for them; a bound "
                             "one authenticates a DICOMweb sending system; web_tls_client_ca)")


def web_tls_files(settings: Settings) -> dict[str, Any]:
    """uvicorn's TLS arguments from the settings, the files checked first: a missing or mismatched file is a
    :class:`~worker.errors.StartupError` naming it (uvicorn would fail inside its thread with a traceback).

    With ``web_tls_client_ca`` a client certificate is asked for but optional (browsers without one still reach the
    login page); one that does not chain to that CA fails the handshake. The request then carries the verified
    certificate (:class:`worker.web.client_certs.ClientCertificateProtocol`)."""
    if settings.web_tls_cert is None or settings.web_tls_key is None:
        return {}
    import ssl

    from dicom_io.tls import TLSConfigError, server_context
    from worker.errors import StartupError

    try:
        server_context(settings.web_tls_cert, settings.web_tls_key, settings.web_tls_client_ca)
    except TLSConfigError as exc:
        raise StartupError(f"cannot serve the web app over HTTPS: {exc}") from None
    files: dict[str, Any] = {"ssl_certfile": str(settings.web_tls_cert), "ssl_keyfile": str(settings.web_tls_key)}
    if settings.web_tls_client_ca is not None:
        from worker.web.client_certs import ClientCertificateProtocol

        files.update(ssl_ca_certs=str(settings.web_tls_client_ca), ssl_cert_reqs=ssl.CERT_OPTIONAL,
                     http=ClientCertificateProtocol)
    return files


def _database(settings: Settings) -> Any:
    from worker.db import Database, upgrade_database

    database = Database(settings.effective_database_url)
    upgrade_database(database)
    return database


def build_server(settings: Settings, database: Any = None, on_correction: Any = None, readiness: Any = None) -> Any:
    """A uvicorn server for the web app on ``settings.web_host:web_port`` (not started)."""
    import uvicorn

    from worker.logs import uvicorn_log_config
    from worker.web.app import create_app

    app = create_app(settings, database or _database(settings), on_correction=on_correction, readiness=readiness)
    config = uvicorn.Config(app, host=settings.web_host, port=settings.web_port, log_level="info",
                            proxy_headers=True, server_header=False,
                            log_config=uvicorn_log_config(settings.log_format), **web_tls_files(settings))
    return uvicorn.Server(config)


def start_in_thread(settings: Settings, database: Any = None, on_correction: Any = None,
                    readiness: Any = None) -> tuple[Any, threading.Thread]:
    """Run the web server in a daemon thread (for ``serve``); stop it with ``server.should_exit = True``."""
    server = build_server(settings, database, on_correction, readiness)
    # uvicorn installs no signal handlers outside the main thread: the caller's own handling stays in charge.
    thread = threading.Thread(target=server.run, name="web", daemon=True)
    thread.start()
    return server, thread


def _web(args: argparse.Namespace) -> int:
    from worker.health import ProcessHealth, Readiness, standard_checks

    settings = read_settings(args)
    database = _database(settings)
    readiness = Readiness("web", standard_checks(settings, database))
    health = ProcessHealth(settings.model_copy(update={"health_port": 0}), readiness,
                           url=settings.web_url).start()
    # uvicorn (0.29 on) shuts the app down on SIGTERM, puts back the handler it found and raises the signal again
    # for it: this one makes a complete shutdown end with status 0, as the other commands do, not by the signal.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        build_server(settings, database, readiness=readiness).run()
    finally:
        health.stop()
    return 0


def _exit_cleanly(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def _read_password(from_stdin: bool) -> str:
    if from_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if first != getpass.getpass("Repeat password: "):
        raise SystemExit("dicom-triage: the passwords differ")
    return first


def _users_add(args: argparse.Namespace) -> int:
    from worker.web.users import UserError, add_user

    settings = read_settings(args)
    database = _database(settings)
    password = _read_password(args.password_stdin)
    try:
        with database.session() as session:
            add_user(session, args.name, args.role, password)
    except UserError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return 2
    print(f"added {args.role} {args.name}")
    return 0


def _in_tokens_session(args: argparse.Namespace, change: Callable[[Any], Any]) -> tuple[bool, Any]:
    """``change(session)`` in one transaction on the configured database: ``(True, its result)``, or ``(False,
    None)`` after printing the :class:`~worker.db.tokens.TokenError` it raised."""
    from worker.db.tokens import TokenError

    database = _database(read_settings(args))
    try:
        with database.session() as session:
            return True, change(session)
    except TokenError as exc:
        print(f"dicom-triage: {exc}", file=sys.stderr)
        return False, None
    finally:
        database.dispose()


def _tokens_add(args: argparse.Namespace) -> int:
    from worker.db.tokens import add_token

    done, token = _in_tokens_session(args, lambda session: add_token(session, args.name))
    if not done:
        return 2
    print(token)  # alone on stdout, for scripts; it is not stored and cannot be shown again
    return 0


def _tokens_add_certificate(args: argparse.Namespace) -> int:
    from worker.db.tokens import bind_certificate

    done, _ = _in_tokens_session(args, lambda session: bind_certificate(session, args.name, args.subject))
    if not done:
        return 2
    print(f"bound {args.subject.strip()} to {args.name.strip()}")
    return 0


def _tokens_remove_certificate(args: argparse.Namespace) -> int:
    from worker.db.tokens import unbind_certificate

    done, name = _in_tokens_session(args, lambda session: unbind_certificate(session, args.subject))
    if not done:
        return 2
    print(f"removed the binding of {args.subject.strip()} to {name}")
    return 0


def _users_list(args: argparse.Namespace) -> int:
    from worker.web.users import list_users

    with _database(read_settings(args)).session() as session:
        for user in list_users(session):
            print(f"{user.name}\t{user.role}\t{'active' if user.active else 'disabled'}")
    return 0


def _users_disable(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from worker.db import User
    from worker.web.users import set_active

    with _database(read_settings(args)).session() as session:
        user_id = session.scalar(select(User.id).where(User.name == args.name))
        if user_id is None:
            print(f"dicom-triage: no user {args.name!r}", file=sys.stderr)
            return 2
        set_active(session, user_id, False)
    print(f"disabled {args.name}")
    return 0


def _users_unlock(args: argparse.Namespace) -> int:
    from worker.web.users import unlock

    with _database(read_settings(args)).session() as session:
        lifted = unlock(session, args.name)
    if lifted is None:
        print(f"dicom-triage: no user {args.name!r} and no failed logins under that name", file=sys.stderr)
        return 2
    print(f"unlocked {args.name}" if lifted else f"{args.name} had no recent failed logins")
    return 0
