// The CHECK macro of the native unit tests: counts and reports a failure, keeps going.
// Each test file defines `static int failures` and returns it (non-zero fails ctest).
#pragma once

#include <cstdio>

#define CHECK(cond, ...)                                            \
  do {                                                              \
    if (!(cond)) {                                                  \
      ++failures;                                                   \
      std::printf("FAIL %s:%d: %s -- ", __FILE__, __LINE__, #cond); \
      std::printf(__VA_ARGS__);                                     \
      std::printf("\n");                                            \
    }                                                               \
  } while (0)
