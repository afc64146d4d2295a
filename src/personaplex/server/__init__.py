"""`personaplex serve`: the real-time websocket server.

One model loop steps every active conversation together each 80 ms tick (`loop`); the aiohttp app speaks the
released `/api/chat` protocol (`protocol`, `app`); `cli` is the sub-command. Importing starts nothing.
"""

from .app import ChatServer, ServerSettings, create_app, make_runner
from .cli import build_server
from .loop import ModelLoop, Slot
from .protocol import ChatRequest, Kind, ProtocolError, parse_query

__all__ = ["ChatServer", "ServerSettings", "create_app", "make_runner", "build_server", "ModelLoop", "Slot",
           "ChatRequest", "Kind", "ProtocolError", "parse_query"]
