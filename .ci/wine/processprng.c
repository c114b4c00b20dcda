/* bcryptprimitives.dll for Wine 8.0, which lacks ProcessPrng: Rust's
 * standard library (1.78 and later) imports it to seed its hash maps, and
 * without it every Windows test binary exits at once with status 53.
 * ProcessPrng fills the buffer from the system's generator, which
 * RtlGenRandom (advapi32's SystemFunction036) also draws from. */
#include <windows.h>

BOOLEAN WINAPI SystemFunction036(PVOID buffer, ULONG length);

BOOL WINAPI ProcessPrng(PBYTE data, SIZE_T len)
{
    while (len > 0) {
        ULONG chunk = len > 0x40000000 ? 0x40000000 : (ULONG)len;
        if (!SystemFunction036(data, chunk))
            return FALSE;
        data += chunk;
        len -= chunk;
    }
    return TRUE;
}
