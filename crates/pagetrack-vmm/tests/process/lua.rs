//! Lua 5.4, statically linked from Debian's `liblua5.4-dev` into a small C host program: a
//! script (tables, sorting, closures, coroutines, string patterns and formatting, floating
//! point, the garbage collector, a file read through `io.open`) prints exactly what it prints
//! natively, untracked and with stack, heap and data tracked (the oracle replaying).

use std::process::Command;

use pagetrack_testkit::kvm_or_skip;
use pagetrack_vmm::process::{Input, ProcessEnd};

use super::memtest::build;
use super::{Mode, TempDir, run_guest};

const LUA_HOST_C: &str = r#"
#include <stdio.h>
#include <lua.h>
#include <lualib.h>
#include <lauxlib.h>
int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: lua-host SCRIPT [ARG]\n"); return 2; }
    lua_State *L = luaL_newstate();
    luaL_openlibs(L);
    lua_pushstring(L, argc > 2 ? argv[2] : "");
    lua_setglobal(L, "ARG");
    lua_pushstring(L, argc > 3 ? argv[3] : "data.txt");
    lua_setglobal(L, "DATA");
    if (luaL_dofile(L, argv[1]) != LUA_OK) {
        fprintf(stderr, "lua: %s\n", lua_tostring(L, -1));
        lua_close(L);
        return 1;
    }
    lua_close(L);
    return 0;
}
"#;

const SCRIPT: &str = r#"
local n = tonumber(ARG) or 2000
-- tables and sorting
local t = {}
local x = 12345
for i = 1, n do
  x = (x * 1103515245 + 12345) % 2147483648
  t[i] = x % 100000
end
table.sort(t)
local sum = 0
for _, v in ipairs(t) do sum = sum + v end
print("sorted", #t, t[1], t[#t], sum)
-- closures and string building
local function counter()
  local c = 0
  return function() c = c + 1; return c end
end
local c1, c2 = counter(), counter()
for _ = 1, 10 do c1() end
print("closures", c1(), c2())
local parts = {}
for i = 1, math.min(n, 200) do parts[#parts + 1] = string.format("%03d:%x", i, i * i) end
local s = table.concat(parts, ",")
print("concat", #s, s:sub(1, 15))
-- patterns
local words = 0
for w in ("the quick brown fox jumps over the lazy dog"):gmatch("%a+") do words = words + 1 end
print("gsub", (("hello world from lua"):gsub("(%w+)", "<%1>")), words)
-- coroutines
local gen = coroutine.wrap(function()
  for i = 1, 5 do coroutine.yield(i * i) end
end)
local acc = {}
for _ = 1, 5 do acc[#acc + 1] = gen() end
print("coroutine", table.concat(acc, " "))
-- floating point and integers
print("math", string.format("%.10f %.3e %d %s", math.pi, 1 / 3, 7 // 2, tostring(2 ^ 53)))
print("int", math.maxinteger, math.mininteger, 7 % -3, -7 // 2)
-- a file inside the directory
local f = assert(io.open(DATA, "r"))
local lines = 0
for _ in f:lines() do lines = lines + 1 end
f:close()
print("file lines", lines)
-- the garbage collector on a pile of garbage
for i = 1, n do local g = { i, tostring(i), { i } } end
collectgarbage("collect")
print("gc ok", collectgarbage("count") > 0)
io.write("done\n")
"#;

#[test]
fn lua_script_matches_native_untracked_and_tracked() {
    let _kvm = kvm_or_skip!();
    assert!(
        std::path::Path::new("/usr/include/lua5.4/lua.h").exists(),
        "liblua5.4-dev is missing (scripts/test installs it)"
    );
    let d = TempDir::new("lua");
    let exe = build(
        &d.0,
        "lua-host",
        LUA_HOST_C,
        &["-I/usr/include/lua5.4", "-llua5.4", "-lm"],
    );
    std::fs::write(d.join("script.lua"), SCRIPT).unwrap();
    let data: String = (0..40).map(|i| format!("line {i}\n")).collect();
    std::fs::write(d.join("data.txt"), data).unwrap();
    // Every store of the Lua VM to a tracked page is an exit: a short script when tracked.
    for (mode, n) in [(Mode::Untracked, "20000"), (Mode::StackHeapData, "8")] {
        let (script, data) = (d.join("script.lua"), d.join("data.txt"));
        let args = [script.to_str().unwrap(), n, data.to_str().unwrap()];
        let native = Command::new(&exe).args(args).output().unwrap();
        assert!(native.status.success(), "native lua: {native:?}");
        let kvm = kvm_ioctls::Kvm::new().unwrap();
        let run = run_guest(kvm, &exe, &args, &d.0, Input::Null, mode);
        assert_eq!(
            run.outcome.end,
            ProcessEnd::Exited(0),
            "{mode:?}: {}",
            String::from_utf8_lossy(&run.outcome.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&run.outcome.stdout),
            String::from_utf8_lossy(&native.stdout),
            "{mode:?}"
        );
        if let Some(r) = &run.oracle {
            r.assert_holds(&format!("lua {mode:?}"));
        }
    }
}
