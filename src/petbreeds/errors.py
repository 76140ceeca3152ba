"""The one exception type users see: a message that says what is wrong and what to do."""


class PetbreedsError(Exception):
    """A problem with the user's data, params or environment, reported without a traceback.

    Stage scripts and the CLI catch it (see :func:`petbreeds.stage.run_stage`) and print
    ``error: <message>``; the message must name the file or params key and say what to do.
    """
