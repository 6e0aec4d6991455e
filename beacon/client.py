"""PLACEHOLDER: API client commands (services, endpoints, register, deregister)."""

from __future__ import annotations

import argparse


def add_client_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pass
