"""The one exception type a user should ever see from the pipeline."""


class PipelineError(Exception):
    """Bad input (config, data, checkpoint, missing file) explained in words.

    The CLI prints the message alone, without a traceback, and exits with status 2. The message
    names what is wrong and how to fix it.
    """
