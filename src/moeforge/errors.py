"""The project's one exception type.

Library code raises MoeforgeError with a message a user can act on; the CLI prints it as a
single line on stderr and exits with status 2. Any other exception is a bug and keeps its traceback.
"""


class MoeforgeError(Exception):
    """A problem with the user's input (config, data, checkpoint, ...), not a bug."""
