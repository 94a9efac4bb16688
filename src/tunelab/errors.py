"""The one exception type for mistakes a user can fix: the CLI prints it as plain lines, no traceback."""


class UserError(Exception):
    """A problem in the user's input (file, config key, model name), stated in the user's terms.

    `problems` holds one line per problem, so that every mistake found is reported at once.
    """

    def __init__(self, *problems: str):
        self.problems = [p for p in problems if p]
        super().__init__("\n".join(self.problems))
