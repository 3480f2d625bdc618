"""Re-export of the error family, which lives in the torch-free runtime package."""
from edgepeft.runtimes.errors import *  # noqa: F401,F403
from edgepeft.runtimes.errors import __doc__  # noqa: F401
