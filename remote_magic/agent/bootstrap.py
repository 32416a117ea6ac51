"""The two tiny scripts the client runs with ``python -c`` on the host.

``RUN`` starts a deployed agent version; it exits with
``protocol.EXIT_AGENT_MISSING`` when that version is not there yet, and the
client then sends the agent with ``INSTALL`` (a tar on stdin) and retries.
Both replace ``sys.path[0]`` (the working directory) with the agent folder,
so a ``remote_magic`` folder in the working directory never shadows it, and
refuse an agent version that is not a plain hex name (never a path).

argv for both: ROOT (empty for the default) AGENT_HASH [COMMAND ARGS...]
"""

_ROOT = (
    "import os,sys\n"
    "if not sys.argv[2] or sys.argv[2].strip('0123456789abcdef'):\n"
    " sys.stderr.write('not an agent version: %r\\n'%sys.argv[2]);sys.exit(2)\n"
    "r=os.path.abspath(os.path.expanduser(sys.argv[1] or os.environ.get('REMOTE_MAGIC_ROOT')"
    " or os.path.join('~','.remote_magic')))\n"
    "d=os.path.join(r,'agent',sys.argv[2])\n"
)

RUN = _ROOT + (
    "if not os.path.isfile(os.path.join(d,'remote_magic','agent','cli.py')):\n"
    " sys.stderr.write('remote_magic agent %s is not deployed\\n'%sys.argv[2]);sys.exit(75)\n"
    "sys.path[0]=d\n"
    "from remote_magic.agent.entry import main\n"
    "sys.exit(main(r,sys.argv[2],sys.argv[3:]))\n"
)

# argv: LOG CWD COMMAND...: start COMMAND in its own session, print its pid and start time
# (field 22 of /proc/PID/stat, read before this parent exits so the child cannot be reaped yet), exit.
# Run isolated (``python -I``) in CWD: no module of any working folder or PYTHONPATH is imported.
LAUNCH = (
    "import os,subprocess,sys\n"
    "log=os.open(sys.argv[1],os.O_WRONLY|os.O_CREAT|os.O_APPEND,0o600)\n"
    "p=subprocess.Popen(sys.argv[3:],stdin=subprocess.DEVNULL,stdout=log,stderr=log,cwd=sys.argv[2],"
    "start_new_session=True,close_fds=True)\n"
    "s=open('/proc/%d/stat'%p.pid).read().rsplit(')',1)[1].split()\n"
    "print(p.pid,s[19])\n"
)

INSTALL = _ROOT + (
    "import io,shutil,tarfile,tempfile\n"
    "os.makedirs(r,0o700,exist_ok=True);os.chmod(r,0o700)\n"
    "a=os.path.join(r,'agent');os.makedirs(a,0o700,exist_ok=True)\n"
    "data=sys.stdin.buffer.read()\n"
    "if not os.path.isdir(d):\n"
    " t=tempfile.mkdtemp(dir=a)\n"
    " tarfile.open(fileobj=io.BytesIO(data)).extractall(t)\n"
    " try:os.rename(t,d)\n"
    " except OSError:shutil.rmtree(t)\n"
    "print(d)\n"
)
