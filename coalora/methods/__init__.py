"""Fine-tuning methods behind one interface (DESIGN §4). A method = conf/method/<name>.yaml +
coalora/methods/<name>.py; the yaml's ``_target_`` names the class."""

from coalora.methods.base import Method, SetupContext, build_method

__all__ = ["Method", "SetupContext", "build_method"]
