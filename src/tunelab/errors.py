"""The exceptions for mistakes a user can fix: `UserError` (the CLI prints it as plain lines, no traceback)
and `RequestError` (a server request that cannot be done, answered as OpenAI's error object)."""


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
