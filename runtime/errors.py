"""The one exception type that user-facing code raises for bad input."""


class CfgExportError(Exception):
    """A problem the user can fix: the message says what was received, what was
    expected, and how to fix it. The CLIs print it on one line and exit non-zero."""


def require(module: str, extra: str):
    """Returns the imported optional module, or raises CfgExportError naming the extra.

    Heavy optional packages (onnxruntime, tensorrt, cuda-python, torch) are imported
    where they are used, through this function, so that their absence is one clear line.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise CfgExportError(
            f"{module} is not installed ({exc}): pip install 'cfg-export[{extra}]'"
        ) from None
