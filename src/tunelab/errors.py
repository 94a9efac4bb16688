"""The exceptions for mistakes a user can fix: `UserError` (the CLI prints it as plain lines, no traceback)
and `RequestError` (a server request that cannot be done, answered as OpenAI's error object); and how a
tunelab process reports what stopped it (`reported`), the CLI's and a training process it spawns alike."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable

EXIT_USER_ERROR = 1


class UserError(Exception):
    """A problem in the user's input (file, config key, model name), stated in the user's terms.

    `problems` holds one line per problem, so that every mistake found is reported at once.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))


class RequestError(Exception):
    """A request to the server that cannot be done, as OpenAI reports it: the HTTP status, a message, the
    error's type, the parameter at fault and a code (`serve.http.error` turns it into the response)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind


def quiet_libraries() -> None:
    """What a tunelab process sets before the libraries load (a spawned one too: it inherits the
    environment, not the warning filters)."""
    # transformers' weight-loading bars would interleave with ours (it reads this when first imported).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # peft calls a transformers property that transformers 5 renamed: a warning about their code, not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def reported(call: Callable[[], int], debug: bool | None = False) -> int:
    """`call()`'s exit code; a user error said in one line per problem (exit 1), an interrupt 130, a bug of
    ours in one line (exit 1), never a traceback unless `debug`. `debug=None`: where no `--debug` reaches
    (a spawned process), the line does not offer it."""
    try:
        return call()
    except UserError as e:
        if debug:
            raise
        if os.environ.get("RANK", "0") == "0":  # (every process of a distributed run finds the same)
            for problem in e.problems:
                print(f"error: {problem}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug of ours, not the user's: say so in one line
        if debug:
            raise
        hint = "" if debug is None else " (rerun with --debug for the traceback)"
        print(f"tunelab: internal error: {type(e).__name__}: {e}{hint}", file=sys.stderr)
        return EXIT_USER_ERROR
