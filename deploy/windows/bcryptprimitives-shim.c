/* Test-only shim for running synchub-agent.exe under Wine 8: Rust's std asks
 * bcryptprimitives.dll for ProcessPrng, which Wine 8 lacks. This DLL, placed beside the exe,
 * exports it and fills the buffer from advapi32's RtlGenRandom (SystemFunction036).
 * Real Windows has ProcessPrng (Windows 10+); never ship this DLL there.
 * Built by scripts/build-windows-agent. */
#include <windows.h>
BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);
BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len) {
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk)) return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
