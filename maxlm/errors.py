"""The error every maxlm entry point prints as one line, without a traceback.

A leaf module, so the data loader upstream of the model can raise it too.
"""


class UserError(Exception):
  """A mistake in flags, gin or data that the user fixes; printed without a traceback."""
