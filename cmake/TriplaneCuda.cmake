# Decides whether the CUDA backend is built (TRIPLANE_CUDA = AUTO | ON | OFF).
# Sets TRIPLANE_HAVE_CUDA and, when ON, the imported target triplane_nccl.
set(TRIPLANE_HAVE_CUDA OFF)
string(TOUPPER "${TRIPLANE_CUDA}" _tp_cuda)
if(NOT _tp_cuda STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  find_package(CUDAToolkit QUIET)
  find_path(NCCL_INCLUDE_DIR nccl.h HINTS /usr/local/cuda/include ${CUDAToolkit_INCLUDE_DIRS})
  find_library(NCCL_LIBRARY nccl HINTS /usr/local/cuda/lib64 ${CUDAToolkit_LIBRARY_DIR})
  if(CMAKE_CUDA_COMPILER AND CUDAToolkit_FOUND AND NCCL_INCLUDE_DIR AND NCCL_LIBRARY)
    set(TRIPLANE_HAVE_CUDA ON)
  elseif(_tp_cuda STREQUAL "ON")
    message(FATAL_ERROR "TRIPLANE_CUDA=ON but nvcc, the CUDA toolkit or NCCL was not found "
                        "(nvcc: '${CMAKE_CUDA_COMPILER}', nccl.h: '${NCCL_INCLUDE_DIR}', "
                        "libnccl: '${NCCL_LIBRARY}')")
  endif()
endif()

if(TRIPLANE_HAVE_CUDA)
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
    set(CMAKE_CUDA_ARCHITECTURES 90)   # Hopper (H100/H200): the device machines we run on
  endif()
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  add_library(triplane_nccl UNKNOWN IMPORTED)
  set_target_properties(triplane_nccl PROPERTIES
    IMPORTED_LOCATION "${NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
  message(STATUS "Triplane: CUDA backend ON (arch ${CMAKE_CUDA_ARCHITECTURES}, NCCL ${NCCL_LIBRARY})")
else()
  message(STATUS "Triplane: CUDA backend OFF (CPU backends only)")
endif()
