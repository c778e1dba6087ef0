// See input_faults.h. The handler uses only async-signal-safe calls (open, read, write, _exit).
#include "input_faults.h"

#include <fcntl.h>
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstring>

namespace mk {
namespace {

constexpr int kErrorStatus = 2;  // the merge command's status for input and output errors
char g_prefix[256];

void put(const char* s) {
  size_t n = std::strlen(s);
  while (n > 0) {
    const ssize_t w = write(STDERR_FILENO, s, n);
    if (w <= 0) return;
    s += w;
    n -= static_cast<size_t>(w);
  }
}

uintptr_t parse_hex(const char*& p) {
  uintptr_t v = 0;
  for (;; ++p) {
    const char c = *p;
    if (c >= '0' && c <= '9') v = v * 16 + (c - '0');
    else if (c >= 'a' && c <= 'f') v = v * 16 + (c - 'a' + 10);
    else return v;
  }
}

// The file mapped at addr ("" when addr is in no file mapping), from one /proc/self/maps line:
// "start-end perms offset dev inode path".
bool mapping_of(const char* line, uintptr_t addr, char* path, size_t cap) {
  const char* p = line;
  const uintptr_t start = parse_hex(p);
  if (*p++ != '-') return false;
  const uintptr_t end = parse_hex(p);
  if (addr < start || addr >= end) return false;
  for (int field = 0; field < 4 && *p; ++field) {  // perms, offset, dev, inode
    while (*p == ' ') ++p;
    while (*p && *p != ' ') ++p;
  }
  while (*p == ' ') ++p;
  std::strncpy(path, p, cap - 1);
  path[cap - 1] = '\0';
  return true;
}

void find_mapping(uintptr_t addr, char* path, size_t cap) {
  path[0] = '\0';
  const int fd = open("/proc/self/maps", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return;
  char buf[4096], line[4608];
  size_t used = 0;
  ssize_t got;
  while ((got = read(fd, buf, sizeof(buf))) > 0) {
    for (ssize_t i = 0; i < got; ++i) {
      if (buf[i] != '\n') {
        if (used + 1 < sizeof(line)) line[used++] = buf[i];
        continue;
      }
      line[used] = '\0';
      used = 0;
      if (mapping_of(line, addr, path, cap)) {
        close(fd);
        return;
      }
    }
  }
  close(fd);
}

// Appends s to the message at *end (bounded by limit).
void append(char*& end, const char* limit, const char* s) {
  while (*s && end < limit) *end++ = *s++;
}

void on_bus_error(int, siginfo_t* info, void*) {
  // Several threads may fault on the same truncated file at once: the first reports and exits,
  // the others wait for the exit (a lock-free exchange is async-signal-safe).
  static std::atomic<int> entered{0};
  if (entered.exchange(1) != 0) {
    for (;;) pause();
  }
  char path[4096];
  find_mapping(reinterpret_cast<uintptr_t>(info->si_addr), path, sizeof(path));
  if (path[0] != '/') {  // not a file map: a genuine fault, which gets the default action
    signal(SIGBUS, SIG_DFL);
    entered.store(0);
    return;  // the faulting access runs again and the process ends with SIGBUS
  }
  static char message[sizeof(g_prefix) + sizeof(path) + 256];
  char* end = message;
  const char* limit = message + sizeof(message) - 1;
  append(end, limit, g_prefix);
  append(end, limit, path);
  append(end, limit,
         ": the file changed (was truncated or replaced) while the merge read it; nothing was "
         "published. Run the merge again once the inputs are stable.\n");
  *end = '\0';
  put(message);  // one write: the line is never interleaved
  _exit(kErrorStatus);
}

}  // namespace

PyObject* install_input_fault_handler(PyObject*, PyObject* args) {
  const char* prefix = "";
  if (!PyArg_ParseTuple(args, "s", &prefix)) return nullptr;
  std::strncpy(g_prefix, prefix, sizeof(g_prefix) - 1);
  struct sigaction action {};
  action.sa_sigaction = on_bus_error;
  action.sa_flags = SA_SIGINFO;
  sigemptyset(&action.sa_mask);
  if (sigaction(SIGBUS, &action, nullptr) != 0) return PyErr_SetFromErrno(PyExc_OSError);
  Py_RETURN_NONE;
}

}  // namespace mk
