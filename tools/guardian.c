/*
 * The outermost process of the standalone build (tools/binary.py, docs/standalone.md).
 *
 * staticx's launcher and PyInstaller's each unpack into a directory under $TMPDIR and remove
 * it when their child exits, but each installs its signal handlers only after it has
 * unpacked and forked: a signal in those first tenths of a second ends it by the default
 * action and leaves its directory behind. This program replaces staticx's launcher and runs
 * around PyInstaller's, and removes what is unpacked whenever and however a signal arrives:
 *
 *  1. SIGINT, SIGTERM, SIGHUP and SIGQUIT are blocked before anything else, and stay
 *     blocked in this process for good: they are read from a signalfd in the wait loop, so
 *     one arriving at any moment is held pending until that loop sees it. The core size
 *     limit becomes 0 for this process and its descendants.
 *  2. A private directory, $TMPDIR/collect-XXXXXX (mkdtemp, mode 0700), is made.
 *  3. staticx's archive, appended to this file (the PyInstaller program, its loader and C
 *     library), is unpacked into it, and the program's loader path (PT_INTERP) and library
 *     path (DT_RPATH) are set to point there, as staticx's own launcher does.
 *  4. A child gets the caller's signal mask back, TMPDIR pointing at the private directory
 *     (so PyInstaller's directory is made inside it) and the caller's TMPDIR in
 *     COLLECT_USER_TMPDIR (collect puts it back for itself), SIGINT ignored until Python is
 *     ready for it (see `ready` below), SIGTERM as its parent-death signal, and executes the
 *     program with this process's argv.
 *  5. This process, a child subreaper (processes its child leaves orphaned become its own),
 *     passes signals on to its children until none is left, removes the private directory
 *     without following symbolic links, and ends as its child did: the same exit status, or
 *     killed by the same signal.
 *
 * A signal that arrives before the child is started means it is never started: the
 * directory is removed and this process dies of that signal. Only SIGKILL of this process
 * leaves the directory (holding what this process unpacked) behind.
 *
 * Built with `gcc -static -Os` by tools/binary.py, which appends staticx's archive and a
 * trailer: the 8-byte magic below, then the archive's offset and size (little-endian 64-bit).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <dirent.h>
#include <elf.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/statvfs.h>
#include <sys/wait.h>
#include <unistd.h>

#define MAGIC "COLLECT\x01"
#define TRAILER_SIZE 24
/* Names staticx gives, in its archive, to links to the program and to its loader. */
#define PROGRAM_LINK ".staticx.prog"
#define INTERP_LINK ".staticx.interp"

static const int FORWARDED[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT};
#define NFORWARDED (sizeof(FORWARDED) / sizeof(FORWARDED[0]))

static char private_dir[4096];

static void remove_private_dir(void);

/* One line on stderr, the private directory removed, exit status 1 (collect's "error"). */
static void fail(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void fail(const char *fmt, ...)
{
    va_list ap;
    fputs("collect: error: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    remove_private_dir();
    exit(1);
}

static int remove_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)ftw;
    /* FTW_DP: a directory, after its contents (FTW_DEPTH). */
    if ((flag == FTW_DP ? rmdir(path) : unlink(path)) != 0 && errno != ENOENT)
        fprintf(stderr, "collect: warning: cannot remove %s: %s\n", path, strerror(errno));
    return 0;
}

static void remove_private_dir(void)
{
    if (private_dir[0] == '\0')
        return;
    /* FTW_PHYS: a symbolic link is removed, never followed; FTW_MOUNT: never leave the
     * filesystem the directory is on. */
    nftw(private_dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS | FTW_MOUNT);
    private_dir[0] = '\0';
}

static uint64_t le64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t octal(const char *field, size_t size)
{
    uint64_t v = 0;
    for (size_t i = 0; i < size && field[i] >= '0' && field[i] <= '7'; i++)
        v = v * 8 + (uint64_t)(field[i] - '0');
    return v;
}

/* A name from the archive as a path in the private directory: one plain file name, or fail. */
static void member_path(char *path, size_t size, const char *name)
{
    if (name[0] == '\0' || strchr(name, '/') != NULL || strcmp(name, ".") == 0 ||
        strcmp(name, "..") == 0)
        fail("this file is damaged: its archive names \"%s\"", name);
    snprintf(path, size, "%s/%s", private_dir, name);
}

static Elf64_Shdr *section(Elf64_Ehdr *ehdr, size_t size, const char *name)
{
    if (ehdr->e_shoff == 0 || ehdr->e_shentsize != sizeof(Elf64_Shdr) ||
        ehdr->e_shoff + (uint64_t)ehdr->e_shnum * sizeof(Elf64_Shdr) > size ||
        ehdr->e_shstrndx >= ehdr->e_shnum)
        return NULL;
    Elf64_Shdr *sections = (Elf64_Shdr *)((char *)ehdr + ehdr->e_shoff);
    Elf64_Shdr *names = &sections[ehdr->e_shstrndx];
    for (int i = 0; i < ehdr->e_shnum; i++) {
        if (names->sh_offset + sections[i].sh_name + strlen(name) + 1 > size ||
            sections[i].sh_offset + sections[i].sh_size > size)
            continue;
        if (strcmp((char *)ehdr + names->sh_offset + sections[i].sh_name, name) == 0)
            return &sections[i];
    }
    return NULL;
}

/* `room`: the longest private directory path the program has room for. */
static void tmpdir_too_long(size_t room) __attribute__((noreturn));
static void tmpdir_too_long(size_t room)
{
    const size_t name = sizeof("/collect-XXXXXX") - 1;
    fail("TMPDIR is too long: its real path has %zu bytes, and the program has room for %zu",
         strlen(private_dir) - name, room > name ? room - name : 0);
}

/* Point the program at the loader and libraries in the private directory, in place: staticx
 * made its PT_INTERP and DT_RPATH strings long enough (what its own launcher does). */
static void patch_program(const char *path)
{
    int fd = open(path, O_RDWR | O_NOFOLLOW | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0)
        fail("cannot open %s: %s", path, strerror(errno));
    size_t size = (size_t)st.st_size;
    char *map = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (map == MAP_FAILED)
        fail("cannot map %s: %s", path, strerror(errno));
    Elf64_Ehdr *ehdr = (Elf64_Ehdr *)map;
    if (size < sizeof(*ehdr) || memcmp(ehdr->e_ident, ELFMAG, SELFMAG) != 0 ||
        ehdr->e_ident[EI_CLASS] != ELFCLASS64 || ehdr->e_phentsize != sizeof(Elf64_Phdr) ||
        ehdr->e_phoff + (uint64_t)ehdr->e_phnum * sizeof(Elf64_Phdr) > size)
        fail("this file is damaged: its program is no 64-bit ELF file");

    char interp[sizeof(private_dir) + 32];
    snprintf(interp, sizeof(interp), "%s/%s", private_dir, INTERP_LINK);
    Elf64_Phdr *phdrs = (Elf64_Phdr *)(map + ehdr->e_phoff);
    int interp_set = 0;
    for (int i = 0; i < ehdr->e_phnum; i++) {
        if (phdrs[i].p_type != PT_INTERP)
            continue;
        if (phdrs[i].p_offset + phdrs[i].p_filesz > size || phdrs[i].p_filesz == 0)
            break;
        if (strlen(interp) + 1 > phdrs[i].p_filesz)
            tmpdir_too_long(phdrs[i].p_filesz - 1 - (strlen(interp) - strlen(private_dir)));
        memset(map + phdrs[i].p_offset, 0, phdrs[i].p_filesz);
        strcpy(map + phdrs[i].p_offset, interp);
        interp_set = 1;
    }

    Elf64_Shdr *dynamic = section(ehdr, size, ".dynamic");
    Elf64_Shdr *dynstr = section(ehdr, size, ".dynstr");
    int rpath_set = 0;
    if (dynamic != NULL && dynstr != NULL) {
        Elf64_Dyn *dyn = (Elf64_Dyn *)(map + dynamic->sh_offset);
        for (size_t i = 0; i < dynamic->sh_size / sizeof(Elf64_Dyn) && dyn[i].d_tag != DT_NULL;
             i++) {
            if (dyn[i].d_tag != DT_RPATH || dyn[i].d_un.d_val >= dynstr->sh_size)
                continue;
            char *rpath = map + dynstr->sh_offset + dyn[i].d_un.d_val;
            size_t room = strnlen(rpath, dynstr->sh_size - dyn[i].d_un.d_val);
            if (strlen(private_dir) > room)
                tmpdir_too_long(room);
            memset(rpath, 0, room);
            memcpy(rpath, private_dir, strlen(private_dir));
            rpath_set = 1;
        }
    }
    if (!interp_set || !rpath_set)
        fail("this file is damaged: its program has no loader or library path to set");
    if (munmap(map, size) != 0 || close(fd) != 0)
        fail("cannot write %s: %s", path, strerror(errno));
}

/* Unpack the archive appended to this executable (staticx's: the program, its loader and
 * libraries, as a tar file of regular files and symbolic links) into the private directory;
 * return the program's path. */
static char *unpack_bundle(void)
{
    static char program[sizeof(private_dir) + 256];
    int self = open("/proc/self/exe", O_RDONLY | O_CLOEXEC);
    if (self < 0)
        fail("cannot open /proc/self/exe (%s): is /proc mounted?", strerror(errno));
    struct stat st;
    unsigned char trailer[TRAILER_SIZE];
    if (fstat(self, &st) != 0 || st.st_size < TRAILER_SIZE ||
        pread(self, trailer, TRAILER_SIZE, st.st_size - TRAILER_SIZE) != TRAILER_SIZE ||
        memcmp(trailer, MAGIC, 8) != 0)
        fail("this file carries no program: it is not a complete standalone build");
    uint64_t offset = le64(trailer + 8), size = le64(trailer + 16);
    if (offset > (uint64_t)st.st_size || size != (uint64_t)st.st_size - TRAILER_SIZE - offset)
        fail("this file is truncated or damaged: its program does not fit in it");

    uint64_t at = offset, end = offset + size;
    program[0] = '\0';
    while (at + 512 <= end) {
        char header[512];
        if (pread(self, header, sizeof(header), (off_t)at) != sizeof(header))
            fail("cannot read this file: %s", strerror(errno));
        if (header[0] == '\0')
            break; /* the archive's end */
        char name[101], target[101], path[sizeof(private_dir) + 128];
        memcpy(name, header, 100);
        name[100] = '\0';
        memcpy(target, header + 157, 100);
        target[100] = '\0';
        uint64_t length = octal(header + 124, 12);
        mode_t mode = (mode_t)octal(header + 100, 8) & 0700;
        at += 512;
        if (length > end - at)
            fail("this file is truncated or damaged: its archive ends early");
        member_path(path, sizeof(path), name);
        if (header[156] == '2') {
            if (symlink(target, path) != 0)
                fail("cannot create %s: %s", path, strerror(errno));
            if (strcmp(name, PROGRAM_LINK) == 0)
                member_path(program, sizeof(program), target);
        } else if (header[156] == '0' || header[156] == '\0') {
            int out = open(path, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode);
            if (out < 0)
                fail("cannot create %s: %s", path, strerror(errno));
            off_t from = (off_t)at;
            uint64_t left = length;
            while (left > 0) {
                ssize_t n = sendfile(out, self, &from, left > (1 << 30) ? (1 << 30) : left);
                if (n < 0 && errno == EINTR)
                    continue;
                if (n <= 0)
                    fail("cannot write %s: %s", path,
                         n < 0 ? strerror(errno) : "unexpected end of file");
                left -= (uint64_t)n;
            }
            /* Closed before exec: a file still open for writing cannot be run (ETXTBSY). */
            if (close(out) != 0)
                fail("cannot write %s: %s", path, strerror(errno));
        } else {
            fail("this file is damaged: its archive holds \"%s\", neither a file nor a link",
                 name);
        }
        at += (length + 511) / 512 * 512;
    }
    close(self);
    if (program[0] == '\0')
        fail("this file is damaged: its archive names no program");
    patch_program(program);
    return program;
}

static void make_private_dir(void)
{
    const char *root = getenv("TMPDIR");
    if (root == NULL || root[0] == '\0')
        root = "/tmp";
    char template[sizeof(private_dir)];
    if (snprintf(template, sizeof(template), "%s/collect-XXXXXX", root) >= (int)sizeof(template))
        fail("TMPDIR is too long");
    if (mkdtemp(template) == NULL)
        fail("cannot create a private directory in %s (%s): set TMPDIR to a writable "
             "directory, e.g. TMPDIR=/dev/shm",
             root, strerror(errno));
    /* Absolute and free of symbolic links: it goes into the program's loader and library
     * paths, which a relative TMPDIR would tie to the current directory. */
    if (realpath(template, private_dir) == NULL) {
        rmdir(template);
        fail("cannot resolve %s: %s", template, strerror(errno));
    }
    struct statvfs fs;
    if (statvfs(private_dir, &fs) == 0 && (fs.f_flag & ST_NOEXEC))
        fail("%s is on a filesystem mounted noexec, where the unpacked runtime cannot run: "
             "set TMPDIR to a directory on one that allows execution",
             root);
}

/* Send `sig` to every child of this process: the one it started and any descendant left
 * orphaned (reparented here, as a subreaper). Not yet reaped, a child's PID cannot be reused
 * between reading /proc and kill(). */
static void signal_children(int sig)
{
    DIR *proc = opendir("/proc");
    if (proc == NULL)
        return;
    pid_t self = getpid();
    struct dirent *entry;
    while ((entry = readdir(proc)) != NULL) {
        if (entry->d_name[0] < '1' || entry->d_name[0] > '9')
            continue;
        char path[300], buf[512];
        snprintf(path, sizeof(path), "/proc/%s/stat", entry->d_name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0)
            continue;
        ssize_t n = read(fd, buf, sizeof(buf) - 1);
        close(fd);
        if (n <= 0)
            continue;
        buf[n] = '\0';
        /* "pid (comm) state ppid ...": comm may hold anything, so parse after the last ')'. */
        char *rest = strrchr(buf, ')');
        char state;
        int ppid;
        if (rest != NULL && sscanf(rest + 1, " %c %d", &state, &ppid) == 2 && ppid == self)
            kill(atoi(entry->d_name), sig);
    }
    closedir(proc);
}

/* Die of `sig` as the child did (or as an unhandled signal would have ended us). */
static void die_of(int sig) __attribute__((noreturn));
static void die_of(int sig)
{
    signal(sig, SIG_DFL);
    sigset_t only;
    sigemptyset(&only);
    sigaddset(&only, sig);
    raise(sig);
    sigprocmask(SIG_UNBLOCK, &only, NULL);
    /* Not a terminating signal after all: the shell's convention. */
    _exit(128 + sig);
}

int main(int argc, char **argv)
{
    (void)argc;
    sigset_t forwarded, caller_mask;
    sigemptyset(&forwarded);
    for (size_t i = 0; i < NFORWARDED; i++)
        sigaddset(&forwarded, FORWARDED[i]);
    sigprocmask(SIG_BLOCK, &forwarded, &caller_mask);

    /* A signal the caller ignores (nohup, or `&` in a script) stays ignored: it is not
     * waited for here, and the child inherits the disposition through exec. */
    sigset_t waited = forwarded;
    for (size_t i = 0; i < NFORWARDED; i++) {
        struct sigaction old;
        if (sigaction(FORWARDED[i], NULL, &old) == 0 && old.sa_handler == SIG_IGN)
            sigdelset(&waited, FORWARDED[i]);
    }
    /* SIGCHLD is waited for too; a caller's SIG_IGN would make children reap themselves. */
    signal(SIGCHLD, SIG_DFL);
    sigaddset(&waited, SIGCHLD);
    sigprocmask(SIG_BLOCK, &waited, NULL);

    /* No core file from any of its processes: a SIGQUIT or a crash would otherwise write
     * one into the current directory of the machine being examined. */
    struct rlimit no_core = {0, 0};
    setrlimit(RLIMIT_CORE, &no_core);

    make_private_dir();
    char *payload = unpack_bundle();
    prctl(PR_SET_CHILD_SUBREAPER, 1);

    const char *user_tmpdir = getenv("TMPDIR");
    /* The child waits on `go` until this process has looked for signals that came before
     * it existed. */
    int go[2];
    if (pipe2(go, O_CLOEXEC) != 0)
        fail("cannot make a pipe: %s", strerror(errno));
    /* Python's SIGINT handler raises KeyboardInterrupt wherever it lands, PyInstaller's
     * start-up code included, which then ends with a traceback and status 1. So the program
     * starts with SIGINT ignored (Python then installs no handler, and neither launcher is
     * ended by one before it passes signals on), and its first runtime hook
     * (tools/pyi_rth_collect.py) gives SIGINT its default action back and writes its PID
     * into `ready`. A SIGINT that came here before that is sent to that PID then. Not when
     * the caller ignores SIGINT: it stays ignored. */
    int sigint_waited = sigismember(&waited, SIGINT);
    int ready[2] = {-1, -1};
    if (sigint_waited && pipe2(ready, O_CLOEXEC) != 0)
        fail("cannot make a pipe: %s", strerror(errno));
    pid_t parent = getpid();
    pid_t child = fork();
    if (child < 0)
        fail("cannot start a process: %s", strerror(errno));
    if (child == 0) {
        close(go[1]);
        char byte;
        ssize_t n;
        while ((n = read(go[0], &byte, 1)) < 0 && errno == EINTR)
            ;
        if (n != 1)
            _exit(127);
        /* Should this process be killed (SIGKILL, which it cannot take), the program is
         * stopped as by SIGTERM: it closes its image and its launchers remove their own
         * directories. */
        prctl(PR_SET_PDEATHSIG, SIGTERM);
        if (getppid() != parent)
            _exit(127);
        if (user_tmpdir != NULL)
            setenv("COLLECT_USER_TMPDIR", user_tmpdir, 1);
        else
            unsetenv("COLLECT_USER_TMPDIR");
        setenv("COLLECT_PRIVATE_DIR", private_dir, 1);
        setenv("TMPDIR", private_dir, 1);
        if (sigint_waited) {
            /* Inherited by the launchers and Python: no close-on-exec. */
            fcntl(ready[1], F_SETFD, 0);
            char fd[16];
            snprintf(fd, sizeof(fd), "%d", ready[1]);
            setenv("COLLECT_READY_FD", fd, 1);
            signal(SIGINT, SIG_IGN);
        }
        /* A signal passed on before this point is still pending: unblocked, it ends the
         * child by its default action, before exec. */
        sigprocmask(SIG_SETMASK, &caller_mask, NULL);
        execv(payload, argv);
        fprintf(stderr, "collect: error: cannot execute %s: %s\n", payload, strerror(errno));
        _exit(127);
    }
    close(go[0]);
    if (sigint_waited)
        close(ready[1]);

    /* A signal so far (before the fork, or between it and here) ends the run before the
     * program starts. One that arrives later was sent after the child existed: if it came
     * from the terminal, the child, in the same process group, has its own copy. */
    sigset_t pending;
    sigpending(&pending);
    for (size_t i = 0; i < NFORWARDED; i++) {
        if (sigismember(&pending, FORWARDED[i]) && sigismember(&waited, FORWARDED[i])) {
            kill(child, SIGKILL);
            while (waitpid(child, NULL, 0) < 0 && errno == EINTR)
                ;
            remove_private_dir();
            die_of(FORWARDED[i]);
        }
    }
    if (write(go[1], "g", 1) != 1)
        fail("cannot start the program: %s", strerror(errno));
    close(go[1]);

    int signals = signalfd(-1, &waited, SFD_CLOEXEC);
    if (signals < 0)
        fail("cannot wait for signals: %s", strerror(errno));
    int status = 0;
    int child_done = 0;
    int sigint_seen = 0;
    pid_t python = 0;
    struct pollfd fds[2] = {{signals, POLLIN, 0}, {ready[0], POLLIN, 0}};
    for (;;) {
        if (poll(fds, ready[0] >= 0 ? 2 : 1, -1) < 0)
            continue; /* EINTR: a stop and continue (SIGSTOP/SIGCONT) */
        if (ready[0] >= 0 && fds[1].revents) {
            char text[32] = "";
            ssize_t n = read(ready[0], text, sizeof(text) - 1);
            if (n > 0)
                python = (pid_t)atoi(text);
            close(ready[0]);
            ready[0] = fds[1].fd = -1;
            if (python > 0 && sigint_seen)
                kill(python, SIGINT);
        }
        if (!fds[0].revents)
            continue;
        struct signalfd_siginfo info;
        if (read(signals, &info, sizeof(info)) != sizeof(info))
            continue;
        int sig = (int)info.ssi_signo;
        if (sig != SIGCHLD) {
            if (sig == SIGINT && python == 0)
                sigint_seen = 1;
            /* One from the terminal (SI_KERNEL) went to the whole foreground process group,
             * the child's processes included: passing it on would only add copies. */
            if (info.ssi_code != SI_KERNEL)
                signal_children(sig);
            continue;
        }
        int wstatus;
        pid_t pid;
        while ((pid = waitpid(-1, &wstatus, WNOHANG)) > 0) {
            if (pid == child) {
                status = wstatus;
                child_done = 1;
            }
            /* A launcher killed before it passed a signal on leaves orphans that have not
             * seen it: they are children of this process now, and get it from here. */
            if (WIFSIGNALED(wstatus))
                signal_children(WTERMSIG(wstatus));
        }
        if (pid < 0 && errno == ECHILD && child_done)
            break;
    }

    remove_private_dir();
    if (WIFSIGNALED(status))
        die_of(WTERMSIG(status));
    return WEXITSTATUS(status);
}
