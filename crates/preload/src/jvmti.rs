//! A JVMTI agent in the same library: `java -agentpath:/path/libmtrace_rs.so`
//! (with the same library in `LD_PRELOAD`) makes the JVM tell us where it puts
//! generated code, and we write each range with its name into the trace as a
//! CODE record, as it happens. A JVM killed by the OOM killer writes no perf
//! map; the trace still names its JIT frames.
//!
//! The JVMTI function table and callback layouts are from `jvmti.h` (JDK 17,
//! unchanged since JVMTI 1.2): functions are numbered from 1, and the
//! callbacks structure starts at event 50 (VMInit).
//!
//! These callbacks run on JVM threads, outside any allocation hook: they may
//! allocate (through `with_internal`, untraced) and take the writer's lock.

use core::ffi::{c_char, c_int, c_void};

use crate::{sys, tracer, writer};

type JvmtiEnv = *const *const *const c_void;
const JVMTI_VERSION_1_2: c_int = 0x3001_0200;
const JVMTI_ENABLE: c_int = 1;
const EVENT_COMPILED_METHOD_LOAD: c_int = 68;
const EVENT_DYNAMIC_CODE_GENERATED: c_int = 70;

/// Function numbers in the jvmtiInterface_1 table (`jvmti.h`).
mod f {
    pub const SET_EVENT_NOTIFICATION_MODE: usize = 2;
    pub const DEALLOCATE: usize = 47;
    pub const GET_CLASS_SIGNATURE: usize = 48;
    pub const GET_METHOD_NAME: usize = 64;
    pub const GET_METHOD_DECLARING_CLASS: usize = 65;
    pub const SET_EVENT_CALLBACKS: usize = 122;
    pub const GENERATE_EVENTS: usize = 123;
    pub const ADD_CAPABILITIES: usize = 142;
}

/// The `n`th function of the JVMTI table.
///
/// # Safety
/// `env` must be a live jvmtiEnv and `T` the function's exact type.
unsafe fn func<T: Copy>(env: JvmtiEnv, n: usize) -> T {
    // SAFETY: a jvmtiEnv points to a pointer to the function table; entries
    // are pointer-sized and numbered from 1.
    unsafe {
        let table = *env;
        core::mem::transmute_copy::<*const c_void, T>(&*table.add(n - 1))
    }
}

type CompiledMethodLoad = unsafe extern "C" fn(
    JvmtiEnv,
    *mut c_void,
    c_int,
    *const c_void,
    c_int,
    *const c_void,
    *const c_void,
);
type DynamicCodeGenerated = unsafe extern "C" fn(JvmtiEnv, *const c_char, *const c_void, c_int);

/// jvmtiEventCallbacks up to DynamicCodeGenerated (event 70); the JVM zeroes
/// the callbacks past the size we pass.
#[repr(C)]
struct Callbacks {
    slots: [*const c_void; 21],
}

unsafe extern "C" fn compiled_method_load(
    env: JvmtiEnv,
    method: *mut c_void,
    code_size: c_int,
    code_addr: *const c_void,
    _map_length: c_int,
    _map: *const c_void,
    _compile_info: *const c_void,
) {
    tracer::with_internal(|| {
        // SAFETY: JVMTI calls with a live env and method during the callback.
        let name = unsafe { method_name(env, method) };
        writer::code(code_addr as u64, code_size.max(0) as u64, name.as_bytes());
    });
}

unsafe extern "C" fn dynamic_code_generated(
    _env: JvmtiEnv,
    name: *const c_char,
    address: *const c_void,
    length: c_int,
) {
    tracer::with_internal(|| {
        // SAFETY: JVMTI passes a NUL-terminated name.
        let n = unsafe { sys::cstr_bytes(name) };
        let mut label = b"[jvm] ".to_vec();
        label.extend_from_slice(n);
        writer::code(address as u64, length.max(0) as u64, &label);
    });
}

/// "pkg.Class.method" from JVMTI's class signature ("Lpkg/Class;") and
/// method name.
///
/// # Safety
/// `env` and `method` must be live JVMTI handles.
unsafe fn method_name(env: JvmtiEnv, method: *mut c_void) -> String {
    type GetName = unsafe extern "C" fn(
        JvmtiEnv,
        *mut c_void,
        *mut *mut c_char,
        *mut *mut c_char,
        *mut *mut c_char,
    ) -> c_int;
    type GetClass = unsafe extern "C" fn(JvmtiEnv, *mut c_void, *mut *mut c_void) -> c_int;
    type GetSig =
        unsafe extern "C" fn(JvmtiEnv, *mut c_void, *mut *mut c_char, *mut *mut c_char) -> c_int;
    type Dealloc = unsafe extern "C" fn(JvmtiEnv, *mut u8) -> c_int;
    let mut out = String::new();
    // SAFETY: the table entries have these types (jvmti.h); every string the
    // JVM hands out is NUL-terminated and given back with Deallocate.
    unsafe {
        let dealloc: Dealloc = func(env, f::DEALLOCATE);
        let mut class: *mut c_void = core::ptr::null_mut();
        if func::<GetClass>(env, f::GET_METHOD_DECLARING_CLASS)(env, method, &mut class) == 0 {
            let mut sig: *mut c_char = core::ptr::null_mut();
            if func::<GetSig>(env, f::GET_CLASS_SIGNATURE)(
                env,
                class,
                &mut sig,
                core::ptr::null_mut(),
            ) == 0
            {
                let s = String::from_utf8_lossy(sys::cstr_bytes(sig));
                let s = s.strip_prefix('L').unwrap_or(&s);
                let s = s.strip_suffix(';').unwrap_or(s);
                out.push_str(&s.replace('/', "."));
                out.push('.');
                dealloc(env, sig as *mut u8);
            }
        }
        let mut name: *mut c_char = core::ptr::null_mut();
        if func::<GetName>(env, f::GET_METHOD_NAME)(
            env,
            method,
            &mut name,
            core::ptr::null_mut(),
            core::ptr::null_mut(),
        ) == 0
        {
            out.push_str(&String::from_utf8_lossy(sys::cstr_bytes(name)));
            dealloc(env, name as *mut u8);
        }
    }
    if out.is_empty() {
        out.push_str("<unknown Java method>");
    }
    out
}

/// Sets the agent up; shared by `Agent_OnLoad` (start-up) and
/// `Agent_OnAttach` (jcmd / attach API).
///
/// # Safety
/// `vm` must be the JavaVM the JVM passes to an agent.
pub unsafe fn start(vm: *mut c_void, attached: bool) -> c_int {
    if !tracer::running() {
        sys::warn(&[b"the JVMTI agent needs the library in LD_PRELOAD too, with tracing on; agent not started"]);
        return 0;
    }
    type GetEnv = unsafe extern "C" fn(*mut c_void, *mut JvmtiEnv, c_int) -> c_int;
    type AddCaps = unsafe extern "C" fn(JvmtiEnv, *const [u32; 4]) -> c_int;
    type SetCallbacks = unsafe extern "C" fn(JvmtiEnv, *const Callbacks, c_int) -> c_int;
    type SetMode = unsafe extern "C" fn(JvmtiEnv, c_int, c_int, *mut c_void) -> c_int;
    type Generate = unsafe extern "C" fn(JvmtiEnv, c_int) -> c_int;
    // SAFETY: a JavaVM points to a JNIInvokeInterface whose 7th entry is
    // GetEnv; the JVMTI entries have the types above (jvmti.h).
    unsafe {
        let invoke = *(vm as *const *const *const c_void);
        let get_env: GetEnv = core::mem::transmute_copy(&*invoke.add(6));
        let mut env: JvmtiEnv = core::ptr::null();
        if get_env(vm, &mut env, JVMTI_VERSION_1_2) != 0 || env.is_null() {
            sys::warn(&[b"JVMTI is not available; JIT frames will not be named"]);
            return 0;
        }
        // can_generate_compiled_method_load_events is bit 27 of the first word.
        let caps: [u32; 4] = [1 << 27, 0, 0, 0];
        if func::<AddCaps>(env, f::ADD_CAPABILITIES)(env, &caps) != 0 {
            sys::warn(&[
                b"JVMTI refused the compiled-method capability; JIT frames will not be named",
            ]);
            return 0;
        }
        let mut cb = Callbacks {
            slots: [core::ptr::null(); 21],
        };
        cb.slots[(EVENT_COMPILED_METHOD_LOAD - 50) as usize] =
            compiled_method_load as CompiledMethodLoad as *const c_void;
        cb.slots[(EVENT_DYNAMIC_CODE_GENERATED - 50) as usize] =
            dynamic_code_generated as DynamicCodeGenerated as *const c_void;
        func::<SetCallbacks>(env, f::SET_EVENT_CALLBACKS)(
            env,
            &cb,
            core::mem::size_of::<Callbacks>() as c_int,
        );
        let mode: SetMode = func(env, f::SET_EVENT_NOTIFICATION_MODE);
        mode(
            env,
            JVMTI_ENABLE,
            EVENT_COMPILED_METHOD_LOAD,
            core::ptr::null_mut(),
        );
        mode(
            env,
            JVMTI_ENABLE,
            EVENT_DYNAMIC_CODE_GENERATED,
            core::ptr::null_mut(),
        );
        if attached {
            // Code compiled before we attached.
            let generate: Generate = func(env, f::GENERATE_EVENTS);
            generate(env, EVENT_DYNAMIC_CODE_GENERATED);
            generate(env, EVENT_COMPILED_METHOD_LOAD);
        }
    }
    0
}
