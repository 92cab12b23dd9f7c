"""What gets captured, how it is described, and where it goes (no vLLM or torch imports)."""

from capture_server.capture.options import CaptureOptions
from capture_server.capture.records import ModelMeta, RoutingRows
from capture_server.capture.sink import MemorySink, RoutingSink

__all__ = ["CaptureOptions", "MemorySink", "ModelMeta", "RoutingRows", "RoutingSink"]
