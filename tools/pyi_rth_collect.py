# PyInstaller runtime hook of the standalone build (tools/binary.spec): the first of the
# program's own code to run, before PyInstaller's hooks and collect's imports.
# The guardian (tools/guardian.c) starts the program with SIGINT ignored, so that no
# KeyboardInterrupt can end PyInstaller's start-up code with a traceback and status 1, and
# it remembers a SIGINT that comes meanwhile. From here until collect's main() installs
# Python's handler, SIGINT has its default action: the process ends as an unhandled SIGINT
# ends one (status 130 in a shell), and the launchers and the guardian clean up. Writing this
# process's PID to the guardian asks it for the SIGINT it kept, if any.
import os
import signal

_ready = os.environ.pop("COLLECT_READY_FD", None)
if _ready is not None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        os.write(int(_ready), b"%d\n" % os.getpid())
        os.close(int(_ready))
    except OSError:
        pass  # the guardian is gone (SIGKILL): nothing to ask for
elif signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
